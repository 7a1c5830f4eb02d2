//! The splice engine: owns every connection after its first message. It takes plain
//! owned sockets, not runtime objects, and runs on its own threads, so a program that
//! embeds the library can hand it connections from any runtime.
//!
//! Each worker thread sleeps on one epoll instance. For a spliced connection it only
//! watches for the close: the bytes never reach it. When a side sends its FIN the worker
//! waits for the kernel to finish moving what came before it, then passes the half-close
//! on; when both directions are closed it removes the pair from the maps and closes both
//! sockets. Sockets the kernel refuses to splice are copied here instead, with the same
//! close semantics.
//!
//! A pair with an idle timeout is reset once no byte has moved either way for that long.
//! The worker never sees spliced bytes, so it asks the kernel (`TCP_INFO`'s time since
//! each socket last sent and received data) when a pair's timeout could first expire,
//! and not before: two getsockopt calls per pair per timeout while it is busy.

mod pair;
mod poll;

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    io,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use pair::{Endpoint, Next, Pair, Side};
use poll::{Epoll, Wakeup};

use crate::{
    admission::Ticket,
    backend::Lease,
    metrics::{Metrics, Refusal},
    probe::{JoinOutcome, MapSocket, Probe, SpliceMaps},
    socket,
};

/// Send buffer for spliced sockets: with the default buffers a splice is no faster than
/// a userspace copy (KERNEL-NOTES pitfall 4). Without CAP_NET_ADMIN the kernel caps it
/// at `net.core.wmem_max`.
pub const SPLICED_SEND_BUFFER: usize = 16 << 20;

/// How often a worker re-checks half-closes that wait for the kernel to drain. The waits
/// measured here took 2-600 us, so a millisecond keeps the close prompt.
const DRAIN_POLL: Duration = Duration::from_millis(1);

/// A connection whose first message has been routed and written to the upstream. Its
/// sockets may be blocking or not: the engine never waits on them.
pub struct Connection {
    pub client: OwnedFd,
    pub upstream: OwnedFd,
    /// Bytes the caller read from the client and wrote, all of them, to the upstream.
    pub forwarded: u64,
    /// Reset the connection once no byte has moved either way for this long.
    pub idle_timeout: Option<Duration>,
    /// The connection's places in the [`Admission`](crate::admission::Admission)
    /// counts, given back when the engine closes it (`Ticket::default()` holds none).
    pub ticket: Ticket,
    pub info: ConnectionInfo,
    /// Counts the connection against its backend (least-conn) until the engine closes
    /// it. None for an address no route lists (a custom [`Router`] may name any).
    ///
    /// [`Router`]: crate::route::Router
    pub lease: Option<Lease>,
}

/// What the access log says about a connection.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    pub client: SocketAddr,
    pub route: Arc<str>,
    pub backend: SocketAddr,
    pub accepted: Instant,
}

/// How a connection's bytes move after its first message, for logs and metrics. A pair
/// with either direction in the kernel counts as spliced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Splice,
    Copy,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Splice => "splice",
            Mode::Copy => "copy",
        }
    }
}

pub struct SpliceEngine {
    workers: Vec<WorkerHandle>,
    next_worker: AtomicUsize,
    live: Arc<AtomicUsize>,
    probe: Option<Arc<Probe>>,
    closing: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

struct WorkerHandle {
    queue: mpsc::Sender<Connection>,
    wakeup: Arc<Wakeup>,
}

impl SpliceEngine {
    /// Starts `workers` threads. Without a probe every connection is copied.
    pub fn new(probe: Option<Arc<Probe>>, workers: usize) -> io::Result<SpliceEngine> {
        let live = Arc::new(AtomicUsize::new(0));
        let closing = Arc::new(AtomicBool::new(false));
        let metrics = Arc::new(Metrics::new(probe.clone()));
        let mut handles = Vec::with_capacity(workers.max(1));
        for index in 0..workers.max(1) {
            let maps = probe
                .as_ref()
                .map(|probe| probe.maps())
                .transpose()
                .map_err(io::Error::other)?;
            let (queue, incoming) = mpsc::channel();
            let wakeup = Arc::new(Wakeup::new()?);
            let worker = Worker {
                epoll: Epoll::new()?,
                wakeup: Arc::clone(&wakeup),
                incoming,
                maps,
                pairs: Vec::new(),
                free: Vec::new(),
                draining: Vec::new(),
                idle_checks: BinaryHeap::new(),
                live: Arc::clone(&live),
                closing: Arc::clone(&closing),
                metrics: Arc::clone(&metrics),
            };
            worker
                .epoll
                .add(wakeup.fd(), poll::READABLE, WAKEUP_TOKEN)?;
            thread::Builder::new()
                .name(format!("splice-{index}"))
                .spawn(move || worker.run())?;
            handles.push(WorkerHandle { queue, wakeup });
        }
        Ok(SpliceEngine {
            workers: handles,
            next_worker: AtomicUsize::new(0),
            live,
            probe,
            closing,
            metrics,
        })
    }

    /// Takes over a connection. It never fails: a connection the kernel will not splice
    /// is copied, and one that cannot be set up at all is closed and logged.
    pub fn adopt(&self, connection: Connection) {
        let index = self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let worker = &self.workers[index];
        self.live.fetch_add(1, Ordering::Relaxed);
        if worker.queue.send(connection).is_ok() {
            worker.wakeup.wake();
        } else {
            // The worker thread is gone (it only ends by panicking); the connection was
            // dropped with the message, which closes it.
            self.live.fetch_sub(1, Ordering::Relaxed);
            tracing::error!("splice worker {index} has stopped; connection closed");
        }
    }

    /// Connections adopted and not yet closed.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    pub fn probe(&self) -> Option<&Arc<Probe>> {
        self.probe.as_ref()
    }

    /// The proxy's metrics: the engine records each connection it adopts, and the
    /// server records through it what happens before.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Ends every connection now, and every one adopted from now on, with a reset: the
    /// end of a graceful shutdown whose grace period is over. A reset, not a FIN,
    /// because the connections did not end: a FIN would let a peer that reads until
    /// the end (an HTTP/1.0 body, a file transfer) take a cut stream for a whole one.
    /// Each is logged as usual, with `end = "reset"`. Returns at once; [`live`] tells
    /// when the workers are done.
    ///
    /// [`live`]: SpliceEngine::live
    pub fn shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        for worker in &self.workers {
            worker.wakeup.wake();
        }
    }
}

const WAKEUP_TOKEN: u64 = u64::MAX;

/// How a pair ended, for its log line and its close.
enum Ending {
    /// Both ends closed their side.
    Closed,
    /// A side reset or failed, or the proxy is shutting down.
    Reset(io::Error),
    /// No byte moved for this long, at least the idle timeout. Reset like an error: the
    /// connection did not end, the proxy gave up on it, and a FIN would let either end
    /// take it for a clean end of stream.
    Idle(Duration),
}

/// Epoll tokens name a pair's slot and side: `slot << 1 | side`.
fn token(slot: usize, side: Side) -> u64 {
    (slot as u64) << 1 | u64::from(side == Side::Upstream)
}

struct Worker {
    epoll: Epoll,
    wakeup: Arc<Wakeup>,
    incoming: mpsc::Receiver<Connection>,
    maps: Option<SpliceMaps>,
    pairs: Vec<Option<Pair>>,
    free: Vec<usize>,
    /// Slots with a half-close waiting for the kernel to drain.
    draining: Vec<usize>,
    /// When to look at a slot's idleness, earliest first. An entry whose time is not
    /// its pair's [`Pair::idle_check`] any more (the pair closed, or was rescheduled) is
    /// stale and skipped.
    idle_checks: BinaryHeap<Reverse<(Instant, usize)>>,
    live: Arc<AtomicUsize>,
    /// Set by [`SpliceEngine::shutdown`].
    closing: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn run(mut self) {
        let mut events = Vec::with_capacity(256);
        loop {
            let next_idle_check = self
                .idle_checks
                .peek()
                .map(|Reverse((due, _))| due.saturating_duration_since(Instant::now()));
            let timeout = if self.draining.is_empty() {
                next_idle_check
            } else {
                Some(next_idle_check.map_or(DRAIN_POLL, |next| next.min(DRAIN_POLL)))
            };
            if let Err(e) = self.epoll.wait(&mut events, timeout) {
                tracing::error!("epoll_wait failed in a splice worker: {e}");
                thread::sleep(DRAIN_POLL);
                continue;
            }
            let mut woken = false;
            for event in &events {
                let (token, flags) = (event.u64, event.events);
                if token == WAKEUP_TOKEN {
                    woken = true;
                    continue;
                }
                let slot = (token >> 1) as usize;
                let side = if token & 1 == 0 {
                    Side::Client
                } else {
                    Side::Upstream
                };
                let Some(Some(pair)) = self.pairs.get_mut(slot) else {
                    continue;
                };
                let next = pair.on_events(side, flags);
                self.settle(slot, next);
            }
            for slot in std::mem::take(&mut self.draining) {
                if let Some(Some(pair)) = self.pairs.get_mut(slot) {
                    let next = pair.advance();
                    self.settle(slot, next);
                }
            }
            self.check_idle();
            // Only now, when no event of this batch can still name a freed slot: a new
            // pair in a reused slot must not receive its predecessor's events.
            if woken {
                self.wakeup.clear();
                while let Ok(connection) = self.incoming.try_recv() {
                    self.adopt(connection);
                }
                if self.closing.load(Ordering::SeqCst) {
                    self.reset_all();
                }
            }
        }
    }

    fn reset_all(&mut self) {
        for slot in 0..self.pairs.len() {
            if self.pairs[slot].is_some() {
                let error = io::Error::other("the proxy is shutting down");
                self.finish(slot, Ending::Reset(error));
            }
        }
    }

    fn adopt(&mut self, connection: Connection) {
        let info = connection.info.clone();
        let connection_forwarded = connection.forwarded;
        match self.start(connection) {
            Ok(slot) => {
                if let Some(Some(pair)) = self.pairs.get_mut(slot) {
                    self.metrics
                        .proxy_started(&pair.info.route, pair.info.backend, pair.mode());
                    // Bytes (or a FIN) may have arrived before epoll was watching.
                    let next = pair.advance();
                    self.settle(slot, next);
                }
            }
            Err(e) => {
                self.live.fetch_sub(1, Ordering::Relaxed);
                self.metrics.refused(Refusal::Setup);
                tracing::warn!(
                    client = %info.client, route = %info.route, backend = %info.backend,
                    bytes_up = connection_forwarded, bytes_down = 0u64,
                    duration_ms = millis(info.accepted.elapsed()),
                    end = Refusal::Setup.as_str(),
                    "connection: setting it up failed: {e}"
                );
            }
        }
    }

    /// Splices the connection if the probe is loaded and the kernel accepts both sockets,
    /// else copies it; registers it with epoll. Returns its slot.
    fn start(&mut self, connection: Connection) -> io::Result<usize> {
        let Connection {
            client,
            upstream,
            forwarded,
            idle_timeout,
            ticket,
            info,
            lease,
        } = connection;
        let mut pair = match &mut self.maps {
            Some(maps) => splice(maps, client, upstream, forwarded, ticket, info, lease)?,
            None => Pair::new(
                Endpoint::new(client, 0),
                Endpoint::new(upstream, 0),
                forwarded,
                ticket,
                info,
                lease,
            ),
        };
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.pairs.push(None);
                self.pairs.len() - 1
            }
        };
        let registered = pair
            .prepare_copying()
            .and_then(|()| {
                self.epoll.add(
                    pair.client.fd(),
                    pair.interest(Side::Client),
                    token(slot, Side::Client),
                )
            })
            .and_then(|()| {
                self.epoll.add(
                    pair.upstream.fd(),
                    pair.interest(Side::Upstream),
                    token(slot, Side::Upstream),
                )
            });
        if let Err(e) = registered {
            self.free.push(slot);
            if pair.in_maps
                && let Some(maps) = &mut self.maps
            {
                maps.leave(pair.client.cookie, pair.upstream.cookie);
                pair.in_maps = false;
            }
            return Err(e);
        }
        if let Some(timeout) = idle_timeout {
            let due = Instant::now() + timeout;
            pair.idle_check = Some((timeout, due));
            self.idle_checks.push(Reverse((due, slot)));
        }
        self.pairs[slot] = Some(pair);
        Ok(slot)
    }

    /// Resets the pairs whose idle timeout has passed, by the kernel's clock of their
    /// last data, and schedules the next look at the others for when theirs could.
    fn check_idle(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((due, slot))) = self.idle_checks.peek() {
            if due > now {
                return;
            }
            self.idle_checks.pop();
            let Some(Some(pair)) = self.pairs.get_mut(slot) else {
                continue;
            };
            let Some((timeout, scheduled)) = pair.idle_check else {
                continue;
            };
            if scheduled != due {
                continue;
            }
            // A socket whose counters cannot be read is looked at again a timeout later;
            // its errors reach the pair through epoll.
            let idle = pair.idle_for().unwrap_or_default();
            if idle >= timeout {
                self.finish(slot, Ending::Idle(idle));
            } else {
                let next = now + (timeout - idle);
                pair.idle_check = Some((timeout, next));
                self.idle_checks.push(Reverse((next, slot)));
            }
        }
    }

    fn settle(&mut self, slot: usize, next: Next) {
        match next {
            Next::Wait => {}
            Next::Poll => {
                if !self.draining.contains(&slot) {
                    self.draining.push(slot);
                }
            }
            Next::Done => self.finish(slot, Ending::Closed),
            Next::Reset(e) => self.finish(slot, Ending::Reset(e)),
        }
    }

    /// Tears a pair down: out of the maps, both sockets closed (with an RST unless both
    /// ends closed, so that both learn it did not end cleanly), one log line.
    fn finish(&mut self, slot: usize, ending: Ending) {
        let Some(mut pair) = self.pairs.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        self.draining.retain(|&s| s != slot);
        // Before the sockets close: whoever sees it end must find it no longer counted
        // against its backend or its limits.
        drop(pair.lease.take());
        drop(std::mem::take(&mut pair.ticket));

        // Closing the sockets, below, takes them out of both SockHashes (the kernel's
        // sock_map_close), which spares four bpf() calls per connection; only the
        // verdict's sequence entries need deleting.
        if pair.in_maps
            && let Some(maps) = &mut self.maps
        {
            maps.ended(pair.client.cookie, pair.upstream.cookie);
        }
        let (sent_up, sent_down) = pair.bytes_sent();
        let mode = pair.mode();
        let info = &pair.info;
        self.metrics
            .proxy_closed(&info.route, info.backend, mode, sent_up, sent_down);
        let duration_ms = millis(info.accepted.elapsed());
        let mode = mode.as_str();
        match &ending {
            Ending::Closed => tracing::info!(
                client = %info.client, route = %info.route, backend = %info.backend, mode,
                bytes_up = sent_up, bytes_down = sent_down, duration_ms, end = "closed",
                "connection"
            ),
            Ending::Reset(e) => tracing::info!(
                client = %info.client, route = %info.route, backend = %info.backend, mode,
                bytes_up = sent_up, bytes_down = sent_down, duration_ms, end = "reset",
                "connection: {e}"
            ),
            Ending::Idle(idle) => tracing::info!(
                client = %info.client, route = %info.route, backend = %info.backend, mode,
                bytes_up = sent_up, bytes_down = sent_down, duration_ms, end = "idle",
                "connection: no byte moved for {idle:?}"
            ),
        }
        if matches!(ending, Ending::Closed) {
            drop(pair);
        } else {
            socket::close_with_reset(pair.client.fd);
            socket::close_with_reset(pair.upstream.fd);
        }
        // Last: a shutdown waits for this count, and the connection's line must be out
        // before the process may exit.
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A duration in milliseconds to the microsecond, as the access log gives it: a number
/// in both log formats, and readable.
pub(crate) fn millis(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1000.0
}

/// Puts a pair into the maps; what the kernel refuses is copied instead.
fn splice(
    maps: &mut SpliceMaps,
    client: OwnedFd,
    upstream: OwnedFd,
    forwarded: u64,
    ticket: Ticket,
    info: ConnectionInfo,
    lease: Option<Lease>,
) -> io::Result<Pair> {
    let client_cookie = socket::cookie(client.as_fd())?;
    let upstream_cookie = socket::cookie(upstream.as_fd())?;
    let client = Endpoint::new(client, client_cookie);
    let upstream = Endpoint::new(upstream, upstream_cookie);
    let mut pair = Pair::new(client, upstream, forwarded, ticket, info, lease);
    if !pair.settle_client_queue()? {
        tracing::debug!(client = %pair.info.client, "client still streaming or closing at the hand-off; copying in userspace");
        return Ok(pair);
    }
    for endpoint in [&pair.client, &pair.upstream] {
        // A smaller buffer is slower, not wrong.
        let _ = socket::grow_send_buffer(endpoint.fd(), SPLICED_SEND_BUFFER);
    }
    // Taken before the inserts: from now on only the kernel writes into either socket.
    let client_written = socket::bytes_written(pair.client.fd())?;
    let upstream_written = socket::bytes_written(pair.upstream.fd())?;
    let joined = maps.join(
        MapSocket {
            fd: pair.client.fd(),
            cookie: pair.client.cookie,
        },
        MapSocket {
            fd: pair.upstream.fd(),
            cookie: pair.upstream.cookie,
        },
    );
    match joined {
        Ok(outcome) => {
            pair.in_maps = true;
            pair.kernel_moves_to_client(client_written);
            if outcome == JoinOutcome::Both {
                pair.kernel_moves_to_upstream(upstream_written);
            }
            // Bytes queued before the inserts wait for a data_ready (pitfall 1).
            let kicked =
                socket::kick_receive_queue(pair.upstream.fd()).and_then(|()| match outcome {
                    JoinOutcome::Both => socket::kick_receive_queue(pair.client.fd()),
                    JoinOutcome::UpstreamOnly => Ok(()),
                });
            if let Err(e) = kicked {
                // The pair is closed unserved: nothing else would delete its sequence
                // entries.
                maps.leave(pair.client.cookie, pair.upstream.cookie);
                return Err(e);
            }
            if outcome == JoinOutcome::UpstreamOnly {
                tracing::debug!(client = %pair.info.client, "client closed during the splice: its last bytes are copied");
            }
        }
        Err(refused) => {
            tracing::debug!(client = %pair.info.client, "{refused}: {}; copying in userspace", refused.source);
        }
    }
    Ok(pair)
}
