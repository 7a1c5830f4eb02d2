//! The splice engine: owns every connection after its first message. It takes plain
//! owned sockets, not runtime objects, and runs on its own threads, so a program that
//! embeds the library can hand it connections from any runtime.
//!
//! Each worker thread sleeps on one epoll instance, which is the proxy's one event loop
//! on that thread: a worker given a listener (`server::Front`) also accepts on it and
//! carries each connection through its first message (`server::Arrival`), then adopts it
//! itself, with no hand-off to another thread. A worker that falls behind on its
//! listener asks another to accept from the same queue (`HELP_AFTER`), which then owns
//! what it accepted in the same way.
//!
//! For a spliced connection a worker only watches for the close: the bytes never reach
//! it. When a side sends its FIN the worker
//! waits for the kernel to finish moving what came before it, then passes the half-close
//! on; when both directions are closed it removes the pair from the maps and closes both
//! sockets. Sockets the kernel refuses to splice are copied here instead, with the same
//! close semantics.
//!
//! A pair with an idle timeout is reset once no byte has moved either way for that long.
//! The worker never sees spliced bytes, so it asks the kernel (`TCP_INFO`'s time since
//! each socket last sent and received data) when a pair's timeout could first expire,
//! and not before: two getsockopt calls per pair per timeout while it is busy.

mod asks;
mod copy;
mod flow;
mod pair;
pub(crate) mod poll;

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
    io,
    os::fd::{AsFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use asks::Inbox;
use pair::{Endpoint, Next, Pair, SpliceLater, Takeover};
use poll::{Epoll, Wakeup};

use crate::{
    admission::Ticket,
    backend::Lease,
    count::ConnectionCount,
    ending::{ConnectionEnd, End, Refusal},
    metrics::Metrics,
    probe::{Cookie, JoinOutcome, MapSocket, Probe, Side, SpliceMaps},
    server::{Accepted, Arrival, Front, Step, Waiting},
    socket,
};

/// What a [`Connection`] carries for its access-log line; [`crate::ending`] owns it.
pub use crate::ending::ConnectionInfo;

/// Send buffer for spliced sockets: with the default buffers a splice is no faster than a
/// userspace copy (docs/kernel.md, "Send buffers decide a splice's speed"). Without
/// CAP_NET_ADMIN the kernel caps it at `net.core.wmem_max`. A destination gets it at its
/// direction's first ask for credit, not at the join: a short exchange never asks, and
/// spares the two calls.
pub const SPLICED_SEND_BUFFER: usize = 16 << 20;

/// How long a connection is copied before it is spliced, unless it streams first
/// (`SpliceLater`, in pair.rs). Short connections, most of what a front proxy sees, end
/// well within it: spliced, each cost the kernel a psock per socket and a kworker item
/// per redirect, and the proxy its map inserts and socket options, for a few bytes
/// (benchmarks/connection-path.md).
pub const DEFAULT_SPLICE_AFTER: Duration = Duration::from_millis(100);

/// How long a worker sleeps after epoll_wait failed, before it tries again.
const WAIT_RETRY: Duration = Duration::from_millis(1);

/// How often a worker sweeps its spliced directions: for parks whose ask the probe's
/// full ring refused, once the count of refusals rose, and while the budget is tight for
/// idle directions whose promise to take back (budget.rs: a direction idle for one
/// interval has its credit lowered, and its promise shrinks one interval later).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// How long a worker waits to accept again after accept failed (EMFILE and friends).
const ACCEPT_RETRY: Duration = Duration::from_millis(10);

/// A worker accepts at most this many connections from a listener per pass of its loop,
/// then turns to its other events and accepts the rest in the next pass: a flood of
/// connects must not keep it from the connections it already serves (their closes,
/// idle checks and the probe's asks for credit).
const ACCEPT_BATCH: usize = 64;

/// A worker that has accepted this many connections in a row from its listener without
/// emptying its queue has fallen behind: it asks another worker to help empty it, and
/// asks the next one after as many more. Steered by CPU, a worker whose CPU receives most
/// connections takes them all, and this bounds how long they wait for it while others
/// idle; a worker that keeps up seldom finds more than a few queued.
const HELP_AFTER: usize = 16;

/// A connection whose first message has been routed and written to the upstream. Its
/// sockets may be blocking or not: the engine never waits on them.
pub struct Connection {
    /// The client's socket.
    pub client: OwnedFd,
    /// The socket connected to the backend.
    pub upstream: OwnedFd,
    /// Bytes the caller read from the client and wrote, all of them, to the upstream.
    pub forwarded: u64,
    /// Reset the connection once no byte has moved either way for this long.
    pub idle_timeout: Option<Duration>,
    /// The connection's places in the [`Admission`](crate::admission::Admission)
    /// counts, given back when the engine closes it (`Ticket::default()` holds none).
    pub ticket: Ticket,
    /// What its access-log line and metrics say about it.
    pub info: ConnectionInfo,
    /// Counts the connection against its backend (least-conn) until the engine closes
    /// it. None for an address no route lists (a custom [`Router`] may name any).
    ///
    /// [`Router`]: crate::route::Router
    pub lease: Option<Lease>,
}

/// The worker threads and what they share. Dropping it resets every connection it
/// holds, closes its listeners, and returns once its threads have ended.
pub struct SpliceEngine {
    workers: Vec<WorkerHandle>,
    next_worker: AtomicUsize,
    live: Arc<ConnectionCount>,
    probe: Option<Arc<Probe>>,
    closer: Closer,
    /// Set when the engine is dropped: the workers end their loops.
    stopping: Arc<AtomicBool>,
    /// The reader of the probe's credit requests, when splicing.
    asks: Option<asks::Reader>,
    metrics: Arc<Metrics>,
}

struct WorkerHandle {
    mailbox: Mailbox,
    thread: JoinHandle<()>,
}

/// Where a worker gets work from outside its thread: from the engine, or from another
/// worker that asks for help.
#[derive(Clone)]
struct Mailbox {
    queue: mpsc::Sender<Work>,
    wakeup: Arc<Wakeup>,
}

impl Mailbox {
    /// Queues `work` and wakes the worker; false if the worker has stopped, and then
    /// `work` is dropped.
    fn send(&self, work: Work) -> bool {
        if self.queue.send(work).is_ok() {
            self.wakeup.wake();
            true
        } else {
            false
        }
    }
}

/// Resets every connection of an engine, from any thread; cloned freely. See
/// [`SpliceEngine::shutdown`].
#[derive(Clone)]
pub struct Closer {
    closing: Arc<AtomicBool>,
    wakeups: Vec<Arc<Wakeup>>,
}

impl Closer {
    /// Resets every connection now, and every one adopted from now on; closes those
    /// still reading their first message. Returns at once.
    pub fn close_now(&self) {
        self.closing.store(true, Ordering::SeqCst);
        for wakeup in &self.wakeups {
            wakeup.wake();
        }
    }
}

/// What a worker is given from outside its thread.
enum Work {
    Adopt(Connection),
    Listen(Front),
    /// Accept from another worker's listener until its queue is empty: that worker has
    /// fallen behind ([`HELP_AFTER`]).
    Help(Front),
}

impl SpliceEngine {
    /// Starts `workers` threads. Without a probe every connection is copied.
    /// `splice_after`: how long the engine copies a connection from its own arrivals
    /// before it splices it, unless the connection streams first; zero splices each one
    /// as it is adopted.
    pub(crate) fn new(
        probe: Option<Arc<Probe>>,
        workers: usize,
        splice_after: Duration,
    ) -> io::Result<SpliceEngine> {
        let metrics = Arc::new(Metrics::new(probe.clone()));
        // Built first and filled in: if a step fails, dropping it ends the workers
        // started before.
        let mut engine = SpliceEngine {
            workers: Vec::with_capacity(workers.max(1)),
            next_worker: AtomicUsize::new(0),
            live: Arc::default(),
            probe,
            closer: Closer {
                closing: Arc::default(),
                wakeups: Vec::with_capacity(workers.max(1)),
            },
            stopping: Arc::default(),
            asks: None,
            metrics,
        };
        let count = workers.max(1);
        let (mailboxes, incomings): (Vec<Mailbox>, Vec<_>) = (0..count)
            .map(|_| {
                let (queue, incoming) = mpsc::channel();
                let wakeup = Arc::new(Wakeup::new()?);
                io::Result::Ok((Mailbox { queue, wakeup }, incoming))
            })
            .collect::<io::Result<Vec<_>>>()?
            .into_iter()
            .unzip();
        let mut inboxes = Vec::with_capacity(count);
        for (index, incoming) in incomings.into_iter().enumerate() {
            let maps = engine
                .probe
                .as_ref()
                .map(|probe| probe.maps())
                .transpose()
                .map_err(io::Error::other)?;
            let mailbox = mailboxes[index].clone();
            let wakeup = Arc::clone(&mailbox.wakeup);
            let inbox = Arc::new(Inbox::default());
            inboxes.push((Arc::clone(&inbox), Arc::clone(&wakeup)));
            let worker = Worker {
                epoll: Epoll::new()?,
                wakeup: Arc::clone(&wakeup),
                incoming,
                // The others, from the next one on: workers that ask start with
                // different helpers.
                helpers: (1..count)
                    .map(|offset| mailboxes[(index + offset) % count].clone())
                    .collect(),
                next_helper: 0,
                inbox,
                asked: Vec::new(),
                maps,
                fronts: Vec::new(),
                accept_retry: None,
                accept_again: Vec::new(),
                unlogged_accept_failures: None,
                arrivals: Slots::default(),
                arrival_deadlines: Timers::default(),
                pairs: Slots::default(),
                sources: HashMap::new(),
                polls: Timers::default(),
                idle_checks: Timers::default(),
                next_sweep: Instant::now() + SWEEP_INTERVAL,
                refused_asks: 0,
                splice_after,
                live: Arc::clone(&engine.live),
                closing: Arc::clone(&engine.closer.closing),
                stopping: Arc::clone(&engine.stopping),
                metrics: Arc::clone(&engine.metrics),
            };
            worker
                .epoll
                .add(wakeup.fd(), poll::READABLE, Token::Wakeup.encode())?;
            let thread = thread::Builder::new()
                .name(format!("splice-{index}"))
                .spawn(move || worker.run())?;
            engine.closer.wakeups.push(wakeup);
            engine.workers.push(WorkerHandle { mailbox, thread });
        }
        if let Some(asks) = engine.probe.as_ref().and_then(|probe| probe.take_asks()) {
            engine.asks = Some(asks::Reader::start(asks, inboxes)?);
        }
        Ok(engine)
    }

    /// Takes over a connection. It never fails: a connection the kernel will not splice
    /// is copied, and one that cannot be set up at all is closed and logged.
    pub fn adopt(&self, connection: Connection) {
        self.live.add();
        if !self.give(Work::Adopt(connection)) {
            // The connection was dropped with the message, which closes it.
            self.live.remove();
        }
    }

    /// Gives `front`'s listener to a worker, which accepts on it from now on, and
    /// adopts what it accepts itself; the others accept from it too while it is behind
    /// ([`HELP_AFTER`]). Workers take listeners in turn.
    pub(crate) fn listen(&self, front: Front) {
        // A listener dropped with the message is closed: connects to it are refused.
        self.give(Work::Listen(front));
    }

    /// Sends `work` to the next worker; false if that worker has stopped.
    fn give(&self, work: Work) -> bool {
        let index = self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        if self.workers[index].mailbox.send(work) {
            true
        } else {
            // The worker thread is gone: it only ends by panicking.
            tracing::error!("splice worker {index} has stopped; what it was given is closed");
            false
        }
    }

    /// Connections adopted and not yet closed.
    pub fn live(&self) -> usize {
        self.live.get()
    }

    /// Waits until no connection is live or `deadline` passes; true if none is.
    pub(crate) fn wait_closed(&self, deadline: Instant) -> bool {
        self.live.wait_zero(deadline)
    }

    /// The loaded probe, when the engine splices; `None` when it copies everything.
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
    /// Each is logged as usual, with `end = "reset"`. Connections still reading their
    /// first message are closed, without a line: they were never proxied. Returns at
    /// once; [`live`] tells when the workers are done.
    ///
    /// [`live`]: SpliceEngine::live
    pub fn shutdown(&self) {
        self.closer.close_now();
    }

    /// A handle that does what [`SpliceEngine::shutdown`] does, from any thread.
    pub fn closer(&self) -> Closer {
        self.closer.clone()
    }
}

impl Drop for SpliceEngine {
    /// Resets what the workers hold (as [`SpliceEngine::shutdown`] does) and joins them:
    /// no worker may outlive the engine, which would leave it holding sockets (and,
    /// through its map handles, the probe's maps) that nothing owns any more.
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.shutdown();
        for worker in self.workers.drain(..) {
            if worker.thread.join().is_err() {
                tracing::error!("a splice worker had panicked");
            }
        }
        drop(self.asks.take());
    }
}

/// What an epoll event is about. Its token: `u64::MAX` the wakeup, below it the
/// listeners (`u64::MAX - 1 - index`), and from 0 up a slot and a socket:
/// `slot << 2 | arrival << 1 | side`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Wakeup,
    Listener(usize),
    Pair(usize, Side),
    Arrival(usize, Waiting),
}

/// More listeners than this in one worker would collide with slot tokens.
const MAX_LISTENERS: u64 = 1 << 16;

impl Token {
    fn encode(self) -> u64 {
        match self {
            Token::Wakeup => u64::MAX,
            Token::Listener(index) => u64::MAX - 1 - index as u64,
            Token::Pair(slot, side) => (slot as u64) << 2 | u64::from(side == Side::Upstream),
            Token::Arrival(slot, on) => (slot as u64) << 2 | 2 | u64::from(on == Waiting::Upstream),
        }
    }

    fn decode(token: u64) -> Token {
        if token == u64::MAX {
            return Token::Wakeup;
        }
        if token >= u64::MAX - 1 - MAX_LISTENERS {
            return Token::Listener((u64::MAX - 1 - token) as usize);
        }
        let slot = (token >> 2) as usize;
        match (token & 2 != 0, token & 1 != 0) {
            (false, false) => Token::Pair(slot, Side::Client),
            (false, true) => Token::Pair(slot, Side::Upstream),
            (true, false) => Token::Arrival(slot, Waiting::Client),
            (true, true) => Token::Arrival(slot, Waiting::Upstream),
        }
    }
}

/// An arrival waiting in a worker, with what the worker registered for it.
struct Arriving {
    arrival: Arrival,
    /// Whether the client and the dialed upstream are registered with epoll.
    registered: [bool; 2],
    /// When it is advanced without an event.
    deadline: Option<Instant>,
}

/// When to look at slots without an event, earliest first. An entry whose time is not
/// what its slot's owner scheduled any more (it closed, or was rescheduled) is stale:
/// the owner of the timers checks and skips it.
#[derive(Default)]
struct Timers(BinaryHeap<Reverse<(Instant, usize)>>);

impl Timers {
    fn push(&mut self, due: Instant, slot: usize) {
        self.0.push(Reverse((due, slot)));
    }

    /// The earliest time scheduled.
    fn next(&self) -> Option<Instant> {
        self.0.peek().map(|Reverse((due, _))| *due)
    }

    /// The earliest entry, if it is due by `now`.
    fn pop_due(&mut self, now: Instant) -> Option<(Instant, usize)> {
        let &Reverse((due, _)) = self.0.peek()?;
        if due > now {
            return None;
        }
        self.0.pop().map(|Reverse(entry)| entry)
    }
}

/// Where an arrival waited before it was advanced.
#[derive(Debug, Clone, Copy)]
struct Was {
    slot: usize,
    registered: [bool; 2],
    deadline: Option<Instant>,
}

/// Slots of values that events name by index. A slot freed while a batch of events is
/// handled is reused only after it, so that a value in a reused slot never receives its
/// predecessor's events.
struct Slots<T> {
    slots: Vec<Option<T>>,
    free: Vec<usize>,
    freed: Vec<usize>,
}

impl<T> Default for Slots<T> {
    fn default() -> Slots<T> {
        Slots {
            slots: Vec::new(),
            free: Vec::new(),
            freed: Vec::new(),
        }
    }
}

impl<T> Slots<T> {
    fn insert(&mut self, value: T) -> usize {
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = Some(value);
                slot
            }
            None => {
                self.slots.push(Some(value));
                self.slots.len() - 1
            }
        }
    }

    /// The slot the next [`Slots::insert`] fills.
    fn next_slot(&self) -> usize {
        self.free.last().copied().unwrap_or(self.slots.len())
    }

    fn get_mut(&mut self, slot: usize) -> Option<&mut T> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.slots.iter_mut().flatten()
    }

    /// Slots taken or free: every slot index is below it.
    fn slot_count(&self) -> usize {
        self.slots.len()
    }

    fn take(&mut self, slot: usize) -> Option<T> {
        let value = self.slots.get_mut(slot).and_then(Option::take);
        if value.is_some() {
            self.freed.push(slot);
        }
        value
    }

    /// Returns `value`, taken from `slot` during this batch, to it: the slot stays its.
    fn put_back(&mut self, slot: usize, value: T) {
        if let Some(at) = self.freed.iter().rposition(|&freed| freed == slot) {
            self.freed.swap_remove(at);
        }
        self.slots[slot] = Some(value);
    }

    /// The batch of events is over: slots freed during it may be reused.
    fn end_batch(&mut self) {
        self.free.append(&mut self.freed);
    }
}

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

impl Ending {
    /// Its `end` in the access log.
    fn end(&self) -> End {
        match self {
            Ending::Closed => End::Closed,
            Ending::Reset(_) => End::Reset,
            Ending::Idle(_) => End::Idle,
        }
    }
}

fn token(slot: usize, side: Side) -> u64 {
    Token::Pair(slot, side).encode()
}

struct Worker {
    epoll: Epoll,
    wakeup: Arc<Wakeup>,
    incoming: mpsc::Receiver<Work>,
    /// The other workers, asked in turn to help when this one falls behind on its
    /// listener.
    helpers: Vec<Mailbox>,
    /// The helper to ask next.
    next_helper: usize,
    /// Cookies of directions the probe asked credit for, from the asks thread.
    inbox: Arc<Inbox>,
    /// The inbox's cookies being handled, kept to reuse the allocation.
    asked: Vec<Cookie>,
    maps: Option<SpliceMaps>,
    /// The listeners this worker accepts on; `None` once the server stopped accepting.
    fronts: Vec<Option<Front>>,
    /// When to accept again after accept failed.
    accept_retry: Option<Instant>,
    /// Listeners a pass left connections queued on ([`ACCEPT_BATCH`]): accepted from
    /// again in the next pass without waiting, since their events are edge-triggered
    /// and come only with the next connection.
    accept_again: Vec<usize>,
    /// Since when accept failures go unlogged, and how many did: a failure is retried
    /// every [`ACCEPT_RETRY`], and logged at most once a second.
    unlogged_accept_failures: Option<(Instant, u64)>,
    /// Connections accepted here that wait for their first message or their backend.
    arrivals: Slots<Arriving>,
    /// When to advance an arrival without an event, earliest first. An entry whose time
    /// is not its arrival's deadline any more is stale and skipped.
    arrival_deadlines: Timers,
    /// Boxed: a pair is 816 bytes, and a table of them grows by doubling, so that a
    /// worker holding most of the connections would carry up to twice its share.
    pairs: Slots<Box<Pair>>,
    /// The slot and side of every socket whose bytes the kernel moves, by cookie.
    sources: HashMap<Cookie, (usize, Side)>,
    /// When to look at a slot without an event (a half-close waiting for the kernel,
    /// parked bytes waiting for room), earliest first. An entry whose time is not its
    /// pair's [`Pair::poll_due`] any more is stale and skipped.
    polls: Timers,
    /// When to look at a slot's idleness, earliest first. An entry whose time is not
    /// its pair's [`Pair::idle_check`] any more (the pair closed, or was rescheduled) is
    /// stale and skipped.
    idle_checks: Timers,
    /// When to sweep the spliced directions next.
    next_sweep: Instant,
    /// The probe's count of refused asks at the last sweep.
    refused_asks: u64,
    /// How long a connection from this proxy's own arrivals is copied before it is
    /// spliced, unless it streams first ([`SpliceLater`]).
    splice_after: Duration,
    live: Arc<ConnectionCount>,
    /// Set by [`SpliceEngine::shutdown`].
    closing: Arc<AtomicBool>,
    /// Set when the engine is dropped: end the loop.
    stopping: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn run(mut self) {
        let mut events = Vec::with_capacity(256);
        loop {
            let now = Instant::now();
            let timeout = [
                self.idle_checks.next(),
                self.polls.next(),
                self.arrival_deadlines.next(),
                self.accept_retry,
                self.maps.as_ref().map(|_| self.next_sweep),
            ]
            .into_iter()
            .flatten()
            .map(|due| due.saturating_duration_since(now))
            .min();
            let again = std::mem::take(&mut self.accept_again);
            let timeout = if again.is_empty() {
                timeout
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.epoll.wait(&mut events, timeout) {
                self.accept_again = again;
                tracing::error!("epoll_wait failed in a splice worker: {e}");
                thread::sleep(WAIT_RETRY);
                continue;
            }
            let mut woken = false;
            for event in &events {
                match Token::decode(event.u64) {
                    Token::Wakeup => woken = true,
                    Token::Listener(index) => self.accept(index),
                    Token::Arrival(slot, _) => self.advance_arrival(slot),
                    Token::Pair(slot, side) => {
                        let Some(pair) = self.pairs.get_mut(slot) else {
                            continue;
                        };
                        let next = pair.on_events(side, event.events, self.maps.as_mut());
                        self.settle(slot, next);
                    }
                }
            }
            for index in again {
                // Its event this pass may have taken its batch already.
                if !self.accept_again.contains(&index) {
                    self.accept(index);
                }
            }
            self.poll_due();
            self.check_idle();
            self.sweep_due();
            self.arrivals_due();
            if self.accept_retry.is_some_and(|due| due <= Instant::now()) {
                self.accept_retry = None;
                for index in 0..self.fronts.len() {
                    self.accept(index);
                }
            }
            if woken {
                self.wakeup.clear();
                self.answer_asks();
                while let Ok(work) = self.incoming.try_recv() {
                    match work {
                        Work::Adopt(connection) => self.adopt(connection, Origin::Adopted),
                        Work::Listen(front) => self.listen(front),
                        Work::Help(front) => self.help(front),
                    }
                }
                if self.closing.load(Ordering::SeqCst) {
                    self.reset_all();
                    self.close_arrivals();
                }
                if self.stopping.load(Ordering::SeqCst) {
                    return;
                }
            }
            self.pairs.end_batch();
            self.arrivals.end_batch();
        }
    }

    /// Watches `front`'s listener from now on, and accepts what is already queued.
    fn listen(&mut self, front: Front) {
        let index = self.fronts.len();
        if let Err(e) = self
            .epoll
            .add(front.fd(), poll::READABLE, Token::Listener(index).encode())
        {
            // Dropping the front closes the listener: connects to it are refused, and
            // the other workers' listeners take the connections.
            tracing::error!(
                "a worker could not watch its listener, which is closed: epoll_ctl: {e}"
            );
            return;
        }
        self.fronts.push(Some(front));
        self.accept(index);
    }

    /// Accepts what is queued on listener `index`, up to [`ACCEPT_BATCH`]: its epoll
    /// event is edge-triggered, so what a full batch leaves is taken up again in the next
    /// pass. Accepting all of it at once, not one a wake, measured faster under load
    /// (benchmarks/connection-path.md, "Fewer system calls at the close").
    fn accept(&mut self, index: usize) {
        let mut accepted = 0;
        loop {
            let Some(Some(front)) = self.fronts.get(index) else {
                return;
            };
            if accepted == ACCEPT_BATCH {
                if !self.accept_again.contains(&index) {
                    self.accept_again.push(index);
                }
                return;
            }
            match front.accept() {
                Accepted::Arrival(arrival) => self.arrival_step(None, arrival.advance()),
                // Counted as well: a flood beyond max_connections is refused one by one.
                Accepted::Refused => {}
                Accepted::Nothing => return,
                Accepted::Stopped => {
                    self.fronts[index] = None;
                    return;
                }
                Accepted::Failed(e) => {
                    self.log_accept_failure(&e);
                    self.accept_retry = Some(Instant::now() + ACCEPT_RETRY);
                    return;
                }
            }
            accepted += 1;
            if accepted % HELP_AFTER == 0 {
                self.ask_for_help(index);
            }
        }
    }

    /// Asks the next other worker to help empty listener `index`'s queue.
    fn ask_for_help(&mut self, index: usize) {
        let Some(Some(front)) = self.fronts.get(index) else {
            return;
        };
        if let Some(helper) = self.helpers.get(self.next_helper) {
            // A helper that has stopped cannot help; the queue is still this worker's.
            helper.send(Work::Help(front.clone()));
            self.next_helper = (self.next_helper + 1) % self.helpers.len();
        }
    }

    /// Accepts from another worker's `front` until its queue is empty or a batch is
    /// taken ([`ACCEPT_BATCH`]; the owner asks again while it is behind), and keeps what
    /// it accepts: a connection stays on the worker that accepted it. Failures are the
    /// owner's to retry; a helper only stops.
    fn help(&mut self, front: Front) {
        for _ in 0..ACCEPT_BATCH {
            match front.accept() {
                Accepted::Arrival(arrival) => {
                    self.metrics.accepted_helping();
                    self.arrival_step(None, arrival.advance());
                }
                Accepted::Refused => {}
                Accepted::Nothing | Accepted::Stopped | Accepted::Failed(_) => return,
            }
        }
    }

    /// Logs a failed accept, at most once a second: it is retried every
    /// [`ACCEPT_RETRY`] while it fails.
    fn log_accept_failure(&mut self, error: &io::Error) {
        let now = Instant::now();
        match &mut self.unlogged_accept_failures {
            Some((since, count)) if now.duration_since(*since) < Duration::from_secs(1) => {
                *count += 1;
            }
            unlogged => {
                match unlogged.map_or(0, |(_, count)| count) {
                    0 => tracing::warn!("accept failed: {error}"),
                    before => tracing::warn!(
                        "accept failed: {error} (and {before} more times since the last line, not logged)"
                    ),
                }
                *unlogged = Some((now, 0));
            }
        }
    }

    /// Moves the arrival in `slot` on, after an event on one of its sockets.
    fn advance_arrival(&mut self, slot: usize) {
        let Some(arriving) = self.arrivals.take(slot) else {
            return;
        };
        let was = Was {
            slot,
            registered: arriving.registered,
            deadline: arriving.deadline,
        };
        self.arrival_step(Some(was), arriving.arrival.advance());
    }

    /// Advances the arrivals whose deadline has passed: each checks the time itself.
    fn arrivals_due(&mut self) {
        let now = Instant::now();
        while let Some((due, slot)) = self.arrival_deadlines.pop_due(now) {
            if self
                .arrivals
                .get_mut(slot)
                .is_some_and(|arriving| arriving.deadline == Some(due))
            {
                self.advance_arrival(slot);
            }
        }
    }

    /// Acts on what an arrival (`was` says where it waited before, if it did) needs next:
    /// wait for a socket, be adopted here, or nothing (it closed).
    fn arrival_step(&mut self, was: Option<Was>, step: Step) {
        let registered = was.map(|was| was.registered).unwrap_or_default();
        match step {
            Step::Wait {
                arrival,
                on,
                interest,
                deadline,
            } => {
                let arriving = Arriving {
                    arrival,
                    registered,
                    deadline,
                };
                // Back in its own slot, or a new one: its events name the slot.
                let slot = match was {
                    Some(was) => {
                        self.arrivals.put_back(was.slot, arriving);
                        was.slot
                    }
                    None => self.arrivals.insert(arriving),
                };
                // A client that trickles its first message waits many times for the
                // same deadline: it is queued once.
                let new_deadline =
                    deadline.filter(|_| was.is_none_or(|was| was.deadline != deadline));
                let Some(waiting) = self.arrivals.get_mut(slot) else {
                    return;
                };
                let token = Token::Arrival(slot, on).encode();
                let fd = match on {
                    Waiting::Client => Some(waiting.arrival.client()),
                    Waiting::Upstream => waiting.arrival.upstream(),
                };
                // Registered before, or not; but a dialed upstream that failed was
                // closed, which took it out of epoll, and the next attempt's socket
                // may have its number: each way falls back to the other.
                let epoll = &self.epoll;
                let watched = fd
                    .ok_or_else(|| io::Error::other("no socket to wait on"))
                    .and_then(|fd| {
                        if waiting.registered[on as usize] {
                            epoll
                                .modify(fd, interest, token)
                                .or_else(|_| epoll.add(fd, interest, token))
                        } else {
                            epoll
                                .add(fd, interest, token)
                                .or_else(|_| epoll.modify(fd, interest, token))
                        }
                    });
                match watched {
                    Ok(()) => {
                        waiting.registered[on as usize] = true;
                        if let Some(due) = new_deadline {
                            self.arrival_deadlines.push(due, slot);
                        }
                    }
                    Err(e) => {
                        if let Some(arriving) = self.arrivals.take(slot) {
                            arriving.arrival.abandon(format_args!(
                                "its worker could not wait for it: epoll_ctl: {e}"
                            ));
                        }
                    }
                }
            }
            Step::Forward {
                connection,
                in_flight,
                header,
            } => {
                // The engine's calls add both sockets to epoll anew.
                for (on, fd) in [
                    (Waiting::Client, connection.client.as_fd()),
                    (Waiting::Upstream, connection.upstream.as_fd()),
                ] {
                    if registered[on as usize] {
                        let _ = self.epoll.delete(fd);
                    }
                }
                self.live.add();
                self.adopt(connection, Origin::Arrived { header });
                // Only now: in flight plus live must never miss it.
                drop(in_flight);
            }
            Step::Closed => {}
        }
    }

    fn reset_all(&mut self) {
        for slot in 0..self.pairs.slots.len() {
            if self.pairs.get_mut(slot).is_some() {
                let error = io::Error::other("the proxy is shutting down");
                self.finish(slot, Ending::Reset(error));
            }
        }
    }

    /// Closes the connections still reading their first message or connecting: never
    /// proxied, they get no access-log line.
    fn close_arrivals(&mut self) {
        for slot in 0..self.arrivals.slots.len() {
            drop(self.arrivals.take(slot));
        }
    }

    fn adopt(&mut self, connection: Connection, origin: Origin) {
        let info = connection.info.clone();
        let connection_forwarded = connection.forwarded;
        match self.start(connection, origin) {
            Ok(slot) => {
                if let Some(pair) = self.pairs.get_mut(slot) {
                    let mode = pair.mode().as_str();
                    self.metrics
                        .proxy_started(&pair.info.route, pair.info.backend, mode);
                    // Bytes or a FIN that arrived before epoll was watching are
                    // reported by the registration itself, as the first events.
                    self.settle(slot, Next::Wait);
                }
            }
            Err(e) => {
                ConnectionEnd::refused(
                    Refusal::Setup,
                    info.client,
                    info.accepted,
                    connection_forwarded,
                )
                .toward(Some(&info.route), Some(info.backend))
                .record(
                    &self.metrics,
                    Some(&format_args!("setting it up failed: {e}")),
                );
                // After its line, as in finish: a shutdown waits for this count.
                self.live.remove();
            }
        }
    }

    /// Splices the connection if the probe is loaded and the kernel accepts both sockets,
    /// else copies it; registers it with epoll. Returns its slot.
    fn start(&mut self, connection: Connection, origin: Origin) -> io::Result<usize> {
        let Connection {
            client,
            upstream,
            forwarded,
            idle_timeout,
            ticket,
            info,
            lease,
        } = connection;
        let splice_later = match origin {
            Origin::Arrived { header } if self.maps.is_some() && !self.splice_after.is_zero() => {
                Some(SpliceLater::new(
                    Instant::now() + self.splice_after,
                    header,
                    self.splice_after,
                ))
            }
            _ => None,
        };
        let mut pair = match &mut self.maps {
            Some(maps) if splice_later.is_none() => splice(
                maps, client, upstream, origin, forwarded, ticket, info, lease,
            )?,
            _ => Pair::new(
                Endpoint::new(client, Cookie::UNMAPPED, origin.nonblocking()),
                Endpoint::new(upstream, Cookie::UNMAPPED, origin.nonblocking()),
                forwarded,
                ticket,
                info,
                lease,
            ),
        };
        pair.splice_later = splice_later;
        let slot = self.pairs.next_slot();
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
        pair.registered = [pair.interest(Side::Client), pair.interest(Side::Upstream)];
        if let Err(e) = registered {
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
            self.idle_checks.push(due, slot);
        }
        for (cookie, side) in pair.kernel_sources() {
            self.sources.insert(cookie, (slot, side));
        }
        Ok(self.pairs.insert(Box::new(pair)))
    }

    /// Grants the credit the probe asked for, or starts moving what it parked. A
    /// cookie this worker does not know belongs to another worker, or to a pair that
    /// has closed since it asked.
    fn answer_asks(&mut self) {
        let mut asked = std::mem::take(&mut self.asked);
        self.inbox.take(&mut asked);
        asked.sort_unstable();
        asked.dedup();
        for cookie in asked.drain(..) {
            let Some(&(slot, side)) = self.sources.get(&cookie) else {
                continue;
            };
            let (Some(pair), Some(maps)) = (self.pairs.get_mut(slot), self.maps.as_mut()) else {
                continue;
            };
            let next = pair.on_ask(side, maps);
            self.settle(slot, next);
        }
        self.asked = asked;
    }

    /// Advances the pairs whose look is due.
    fn poll_due(&mut self) {
        let now = Instant::now();
        while let Some((due, slot)) = self.polls.pop_due(now) {
            let Some(pair) = self.pairs.get_mut(slot) else {
                continue;
            };
            if pair.poll_due != Some(due) {
                continue;
            }
            pair.poll_due = None;
            let next = pair.advance(self.maps.as_mut());
            self.settle(slot, next);
        }
    }

    /// Resets the pairs whose idle timeout has passed, by the kernel's clock of their
    /// last data, and schedules the next look at the others for when theirs could.
    fn check_idle(&mut self) {
        let now = Instant::now();
        while let Some((due, slot)) = self.idle_checks.pop_due(now) {
            let Some(pair) = self.pairs.get_mut(slot) else {
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
                self.idle_checks.push(next, slot);
            }
        }
    }

    /// Once an interval: moves the parks whose ask the probe's ring refused, if it
    /// refused any since the last sweep, and takes back what idle directions were
    /// promised while the budget is tight. A pair whose sockets cannot be read for the
    /// promise is left as it is: its errors reach it through epoll.
    fn sweep_due(&mut self) {
        let now = Instant::now();
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now + SWEEP_INTERVAL;
        let Some(maps) = self.maps.as_mut() else {
            return;
        };
        match maps.asks_refused() {
            Ok(refused) if refused != self.refused_asks => {
                self.refused_asks = refused;
                self.find_lost_parks();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("reading the probe's count of refused asks failed: {e}"),
        }
        let Some(maps) = self.maps.as_mut() else {
            return;
        };
        if !maps.budget().is_tight() {
            return;
        }
        for pair in self.pairs.iter_mut() {
            if let Err(e) = pair.reclaim(maps) {
                tracing::debug!(client = %pair.info.client, "taking back an idle promise: {e}");
            }
        }
    }

    /// Looks at every spliced direction for bytes parked without an ask.
    fn find_lost_parks(&mut self) {
        for slot in 0..self.pairs.slot_count() {
            let (Some(pair), Some(maps)) = (self.pairs.get_mut(slot), self.maps.as_mut()) else {
                continue;
            };
            let next = pair.find_lost_parks(maps);
            self.settle(slot, next);
        }
    }

    fn settle(&mut self, slot: usize, next: Next) {
        let mut due = match next {
            Next::Wait => None,
            Next::Poll(due) => Some(due),
            Next::Done => return self.finish(slot, Ending::Closed),
            Next::Reset(e) => return self.finish(slot, Ending::Reset(e)),
        };
        let Some(pair) = self.pairs.get_mut(slot) else {
            return;
        };
        match pair.takeover() {
            Takeover::Now => {
                if let Err(e) = self.splice_later(slot) {
                    return self.finish(slot, Ending::Reset(e));
                }
                // What a direction left copied (refused by the maps, or a client that
                // closed during the join) queued unread while it was drained.
                let Some(pair) = self.pairs.get_mut(slot) else {
                    return;
                };
                let next = pair.advance(self.maps.as_mut());
                return self.settle(slot, next);
            }
            Takeover::At(at) => due = Some(due.map_or(at, |due| due.min(at))),
            Takeover::NotNow => {}
        }
        pair.report(&self.metrics);
        if let Some(due) = due
            && pair.poll_due.is_none_or(|scheduled| due < scheduled)
        {
            pair.poll_due = Some(due);
            self.polls.push(due, slot);
        }
        // Moving parked bytes needs readiness the spliced sockets are not watched for.
        for side in [Side::Client, Side::Upstream] {
            let interest = pair.interest(side);
            let registered = &mut pair.registered[side as usize];
            if interest != *registered {
                let fd = match side {
                    Side::Client => pair.client.fd(),
                    Side::Upstream => pair.upstream.fd(),
                };
                if let Err(e) = self.epoll.modify(fd, interest, token(slot, side)) {
                    return self.finish(slot, Ending::Reset(e));
                }
                *registered = interest;
            }
        }
    }

    /// Hands a pair copied so far to the kernel (pair.rs, [`SpliceLater`]); a pair the
    /// maps refuse stays copied to its end.
    fn splice_later(&mut self, slot: usize) -> io::Result<()> {
        let (Some(pair), Some(maps)) = (self.pairs.get_mut(slot), self.maps.as_mut()) else {
            return Ok(());
        };
        let Some(later) = pair.splice_later.take() else {
            return Ok(());
        };
        pair.client.cookie = Cookie::of(pair.client.fd())?;
        pair.upstream.cookie = Cookie::of(pair.upstream.fd())?;
        let written = pair.written_by_copy(later.header);
        let buffers = [
            flow::joining_buffer(socket::receive_buffer(pair.client.fd())?),
            flow::joining_buffer(socket::receive_buffer(pair.upstream.fd())?),
        ];
        join(maps, pair, written, buffers)?;
        if pair.in_maps {
            self.metrics
                .spliced_later(&pair.info.route, pair.info.backend);
            for (cookie, side) in pair.kernel_sources() {
                self.sources.insert(cookie, (slot, side));
            }
        }
        Ok(())
    }

    /// Tears a pair down: out of the maps, both sockets closed (with an RST unless both
    /// ends closed, so that both learn it did not end cleanly), one log line.
    fn finish(&mut self, slot: usize, ending: Ending) {
        let Some(mut pair) = self.pairs.take(slot) else {
            return;
        };
        for (cookie, _) in pair.kernel_sources() {
            self.sources.remove(&cookie);
        }
        let recorded = pair
            .in_maps
            .then_some([pair.client.cookie, pair.upstream.cookie]);
        let credited = pair.credited_sources();
        // Before the sockets close: whoever sees it end must find it no longer counted
        // against its backend or its limits.
        drop(pair.lease.take());
        drop(std::mem::take(&mut pair.ticket));

        // What its last look changed, then the bytes it held, which go with it.
        pair.report(&self.metrics);
        self.metrics.held(-(pair.held_reported as i64));
        let line = ConnectionEnd::proxied(
            &pair.info,
            ending.end(),
            pair.mode(),
            pair.bytes_sent(),
            pair.throttles(),
        );
        match &ending {
            Ending::Closed => line.record(&self.metrics, None),
            Ending::Reset(e) => line.record(&self.metrics, Some(e)),
            Ending::Idle(idle) => line.record(
                &self.metrics,
                Some(&format_args!("no byte moved for {idle:?}")),
            ),
        }
        if matches!(ending, Ending::Closed) {
            drop(pair);
        } else {
            socket::close_with_reset(pair.client.fd);
            socket::close_with_reset(pair.upstream.fd);
        }
        // Closing the sockets took them out of both SockHashes (the kernel's
        // sock_map_close); the flow records the join created, and the credit the engine
        // granted, need deleting.
        if let (Some(cookies), Some(maps)) = (recorded, &mut self.maps) {
            maps.forget_flows(&cookies);
            for cookie in credited.into_iter().flatten() {
                maps.forget_credit(cookie);
            }
        }
        // Last: a shutdown waits for this count, and the connection's line must be out
        // before the process may exit.
        self.live.remove();
    }
}

/// Where a connection the engine adopts comes from, which tells what the engine need
/// not ask the kernel.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// A program that embeds the engine: its sockets may block, and what was written
    /// into either is unknown.
    Adopted,
    /// This proxy's own arrival: accepted and dialed non-blocking, nothing written to
    /// its client, and to its upstream a PROXY header of `header` bytes (or none) and
    /// then only what the pair forwarded. So the hand-off computes both sockets' counts
    /// of bytes written (socket.rs, `dialed_bytes_written`) instead of reading them
    /// (three syscalls each), and the copy spares two more.
    Arrived { header: u64 },
}

impl Origin {
    fn nonblocking(self) -> bool {
        matches!(self, Origin::Arrived { .. })
    }
}

/// Puts a pair into the maps; what the kernel refuses is copied instead.
#[allow(clippy::too_many_arguments)]
fn splice(
    maps: &mut SpliceMaps,
    client: OwnedFd,
    upstream: OwnedFd,
    origin: Origin,
    forwarded: u64,
    ticket: Ticket,
    info: ConnectionInfo,
    lease: Option<Lease>,
) -> io::Result<Pair> {
    let client_cookie = Cookie::of(client.as_fd())?;
    let upstream_cookie = Cookie::of(upstream.as_fd())?;
    let client = Endpoint::new(client, client_cookie, origin.nonblocking());
    let upstream = Endpoint::new(upstream, upstream_cookie, origin.nonblocking());
    let mut pair = Pair::new(client, upstream, forwarded, ticket, info, lease);
    if !pair.settle_client_queue()? {
        tracing::debug!(client = %pair.info.client, "client still streaming or closing at the hand-off; copying in userspace");
        return Ok(pair);
    }
    // The bases the kernel's progress in each direction is measured from, exact (a
    // short one would count queued bytes as delivered), and taken before the inserts:
    // from then on only the kernel writes into either socket.
    let written = match origin {
        Origin::Adopted => (
            socket::settled_bytes_written(pair.client.fd())?,
            socket::settled_bytes_written(pair.upstream.fd())?,
        ),
        Origin::Arrived { header } => (0, socket::dialed_bytes_written(header + pair.forwarded())),
    };
    join(
        maps,
        &mut pair,
        written,
        [flow::FIRST_RECEIVE_BUFFER, flow::FIRST_RECEIVE_BUFFER],
    )?;
    Ok(pair)
}

/// Puts both sockets of a pair this process has stopped reading into the maps, the
/// kernel's progress in each direction measured from `written`: what had been written
/// into the client and into the upstream; `[client_buffer, upstream_buffer]` are the
/// receive buffers they join with. What the kernel refuses stays copied; an error is
/// a pair that can be neither.
fn join(
    maps: &mut SpliceMaps,
    pair: &mut Pair,
    (client_written, upstream_written): (u64, u64),
    [client_buffer, upstream_buffer]: [usize; 2],
) -> io::Result<()> {
    let Some([to_upstream, to_client]) = maps.budget().promise_pair() else {
        tracing::debug!(client = %pair.info.client, "splice_backlog_total is promised to other pairs; copying in userspace");
        return Ok(());
    };
    let joined = maps.join(
        MapSocket {
            fd: pair.client.fd(),
            cookie: pair.client.cookie,
        },
        MapSocket {
            fd: pair.upstream.fd(),
            cookie: pair.upstream.cookie,
        },
        to_client.bytes(),
    );
    match joined {
        Ok(outcome) => {
            pair.in_maps = true;
            pair.kernel_moves_to_client(client_written, to_client, upstream_buffer);
            if outcome == JoinOutcome::Both {
                pair.kernel_moves_to_upstream(upstream_written, to_upstream, client_buffer);
            }
            // Each source's receive window starts small and grows only while its
            // destination's reader keeps up (flow.rs, `ReceiveWindow`); set before the
            // kick, whose verdict runs would grow it otherwise. Bytes queued before the
            // inserts wait for a data_ready (docs/kernel.md, "Bytes queued before the
            // insert").
            let kicked = socket::set_receive_buffer(pair.client.fd(), client_buffer)
                .and_then(|()| socket::set_receive_buffer(pair.upstream.fd(), upstream_buffer))
                .and_then(|()| socket::kick_receive_queue(pair.upstream.fd()))
                .and_then(|()| match outcome {
                    JoinOutcome::Both => socket::kick_receive_queue(pair.client.fd()),
                    JoinOutcome::UpstreamOnly => Ok(()),
                });
            if let Err(e) = kicked {
                // The pair is closed unserved: nothing else would delete its records.
                maps.leave(pair.client.cookie, pair.upstream.cookie);
                return Err(e.into());
            }
            if outcome == JoinOutcome::UpstreamOnly {
                tracing::debug!(client = %pair.info.client, "client closed during the splice: its last bytes are copied");
            }
        }
        Err(refused) => {
            tracing::debug!(client = %pair.info.client, "{refused}: {}; copying in userspace", refused.source);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashSet,
        io::{self, Read, Write},
        net::TcpStream,
        os::fd::OwnedFd,
        sync::Arc,
        thread,
        time::{Duration, Instant},
    };

    use super::{
        Connection, ConnectionInfo, MAX_LISTENERS, Side, Slots, SpliceEngine, Timers, Token,
        Waiting,
    };
    use crate::{admission::Ticket, socket::connected};

    #[test]
    fn every_token_decodes_to_what_it_encodes() {
        for token in [
            Token::Wakeup,
            Token::Listener(0),
            Token::Listener(7),
            Token::Pair(0, Side::Client),
            Token::Pair(0, Side::Upstream),
            Token::Pair(123_456, Side::Upstream),
            Token::Arrival(0, Waiting::Client),
            Token::Arrival(99, Waiting::Upstream),
        ] {
            assert_eq!(Token::decode(token.encode()), token, "{token:?}");
        }
    }

    #[test]
    fn a_slot_freed_in_a_batch_is_reused_only_after_it() {
        let mut slots = Slots::default();
        let first = slots.insert("first");
        assert_eq!(slots.take(first), Some("first"));
        let second = slots.insert("second");
        assert_ne!(second, first, "reused within the batch");
        // Taken and put back within the batch: it keeps its slot, which stays in use.
        let third = slots.insert("third");
        let taken = slots.take(third).unwrap();
        slots.put_back(third, taken);
        slots.end_batch();
        assert_eq!(slots.next_slot(), first);
        assert_eq!(slots.insert("fourth"), first);
        assert_eq!(slots.get_mut(third), Some(&mut "third"));
        assert_ne!(slots.next_slot(), third);
    }

    #[test]
    fn the_last_listener_index_decodes_as_a_listener() {
        let last = Token::Listener(MAX_LISTENERS as usize);
        assert_eq!(Token::decode(last.encode()), last);
    }

    #[test]
    fn no_two_tokens_share_an_encoding() {
        let mut tokens = vec![Token::Wakeup];
        tokens.extend((0..64).map(Token::Listener));
        for slot in 0..1024 {
            tokens.push(Token::Pair(slot, Side::Client));
            tokens.push(Token::Pair(slot, Side::Upstream));
            tokens.push(Token::Arrival(slot, Waiting::Client));
            tokens.push(Token::Arrival(slot, Waiting::Upstream));
        }
        let encoded: HashSet<u64> = tokens.iter().map(|token| token.encode()).collect();
        assert_eq!(encoded.len(), tokens.len());
        for token in tokens {
            assert_eq!(Token::decode(token.encode()), token);
        }
    }

    #[test]
    fn a_slot_taken_twice_is_freed_once() {
        let mut slots = Slots::default();
        let slot = slots.insert("first");
        assert_eq!(slots.take(slot), Some("first"));
        assert_eq!(slots.take(slot), None);
        slots.end_batch();
        assert_eq!(slots.insert("second"), slot);
        // Freed twice, it would be handed out again while "second" holds it.
        assert_ne!(slots.insert("third"), slot);
        assert_eq!(slots.get_mut(slot), Some(&mut "second"));
    }

    #[test]
    fn timers_give_the_earliest_entry_first_and_only_once_it_is_due() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut timers = Timers::default();
        assert_eq!(timers.next(), None);
        timers.push(start + ms(30), 1);
        timers.push(start + ms(10), 2);
        timers.push(start + ms(20), 3);
        assert_eq!(timers.next(), Some(start + ms(10)));
        assert_eq!(timers.pop_due(start), None);
        assert_eq!(timers.pop_due(start + ms(20)), Some((start + ms(10), 2)));
        assert_eq!(timers.pop_due(start + ms(20)), Some((start + ms(20), 3)));
        assert_eq!(timers.pop_due(start + ms(20)), None);
        assert_eq!(timers.next(), Some(start + ms(30)));
    }

    #[test]
    fn a_rescheduled_slot_keeps_its_stale_entry_to_be_told_apart_by_its_time() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut timers = Timers::default();
        timers.push(start + ms(10), 7);
        // Rescheduled: the old entry stays, and comes out first with its own time, which
        // is how the worker knows it is stale.
        timers.push(start + ms(40), 7);
        timers.push(start + ms(10), 8);
        let due: Vec<_> = std::iter::from_fn(|| timers.pop_due(start + ms(50))).collect();
        assert_eq!(
            due,
            [
                (start + ms(10), 7),
                (start + ms(10), 8),
                (start + ms(40), 7)
            ]
        );
        assert_eq!(timers.next(), None);
    }

    /// A copying engine (no probe) holding one pair with an idle timeout: the engine,
    /// the pair's client and its backend, and when it was adopted.
    fn engine_with_idle_pair(timeout: Duration) -> (SpliceEngine, TcpStream, TcpStream, Instant) {
        let engine = SpliceEngine::new(None, 1, Duration::ZERO).unwrap();
        let (client_side, client) = connected();
        let (backend, upstream) = connected();
        let adopted = Instant::now();
        engine.adopt(Connection {
            client: OwnedFd::from(client_side),
            upstream: OwnedFd::from(upstream),
            forwarded: 0,
            idle_timeout: Some(timeout),
            ticket: Ticket::default(),
            info: ConnectionInfo {
                client: client.local_addr().unwrap(),
                route: Arc::from("test"),
                backend: backend.local_addr().unwrap(),
                accepted: adopted,
            },
            lease: None,
        });
        (engine, client, backend, adopted)
    }

    /// Sends a byte from `client` through the pair to `backend`.
    fn one_byte(client: &mut TcpStream, backend: &mut TcpStream, byte: u8) {
        client.write_all(&[byte]).unwrap();
        let mut got = [0];
        backend.read_exact(&mut got).unwrap();
        assert_eq!(got, [byte]);
    }

    /// How long after `last_byte` the client saw the pair reset.
    fn reset_after(client: &mut TcpStream, last_byte: Instant) -> Duration {
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let e = client.read(&mut [0]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
        last_byte.elapsed()
    }

    /// A pair that keeps moving bytes outlives its first idle check, and is reset a
    /// timeout after its last byte, not before.
    #[test]
    fn an_idle_pair_is_reset_a_timeout_after_its_last_byte_and_not_before() {
        const TIMEOUT: Duration = Duration::from_millis(400);
        let (engine, mut client, mut backend, adopted) = engine_with_idle_pair(TIMEOUT);
        let mut last_byte = adopted;
        for byte in 0..6 {
            thread::sleep(Duration::from_millis(100));
            last_byte = Instant::now();
            one_byte(&mut client, &mut backend, byte);
        }
        assert!(last_byte - adopted > TIMEOUT, "the bytes ended too soon");
        let idle = reset_after(&mut client, last_byte);
        // The kernel's clock of the last data ticks in jiffies: a few ms either way.
        assert!(idle >= TIMEOUT - Duration::from_millis(10), "{idle:?}");
        assert!(idle < TIMEOUT + Duration::from_secs(5), "{idle:?}");
        assert!(engine.wait_closed(Instant::now() + Duration::from_secs(5)));
    }

    /// A check that finds the pair idle for less than its timeout looks again when the
    /// timeout could first expire (a timeout after the last byte), not a whole timeout
    /// later: a byte early in the first period is reset about a timeout after it, not
    /// nearly two.
    #[test]
    fn an_idle_check_looks_again_when_the_timeout_could_first_expire() {
        const TIMEOUT: Duration = Duration::from_millis(400);
        let (engine, mut client, mut backend, _) = engine_with_idle_pair(TIMEOUT);
        thread::sleep(Duration::from_millis(50));
        let last_byte = Instant::now();
        one_byte(&mut client, &mut backend, 1);
        let idle = reset_after(&mut client, last_byte);
        assert!(idle >= TIMEOUT - Duration::from_millis(10), "{idle:?}");
        assert!(idle < TIMEOUT + Duration::from_millis(250), "{idle:?}");
        assert!(engine.wait_closed(Instant::now() + Duration::from_secs(5)));
    }
}
