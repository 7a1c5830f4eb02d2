//! One proxied connection after its first message: the two sockets and, for each
//! direction, whether the kernel or this process moves its bytes, and how far its close
//! has got. A direction's egress has exactly one writer (the kernel's redirect or our
//! copy, never both), so bytes cannot overtake each other.

use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    time::{Duration, Instant},
};

use super::{
    copy::{CopyBuffer, Drain, Filled},
    flow::{KernelFlow, Unpark},
    poll,
};
use crate::{
    admission::Ticket,
    backend::Lease,
    budget::Promise,
    ending::{ConnectionInfo, Mode},
    metrics::Metrics,
    probe::{Cookie, Side, SpliceMaps},
    socket::{self, SyscallError},
};

/// What a direction of a pair waiting to be spliced copies per look, at most: a stream
/// is spliced once its reads show it streams, not copied whole first.
const COPY_FIRST_BUDGET: u64 = 1 << 20;

/// How long an attempt to hand a copied pair to the kernel may keep its sources
/// drained and unread without moving ([`SpliceLater`]): a fast destination takes what
/// was queued within a millisecond or two.
const SWITCH_ATTEMPT: Duration = Duration::from_millis(20);

/// How long an attempt may go on while it moves: a destination that reads slowly but
/// reads (an emulated guest's sink took 64 MiB in 3.7 s) is waited for, though not for
/// as long as a slow client's whole download.
const SWITCH_ATTEMPT_MAX: Duration = Duration::from_secs(1);

/// The longest wait between attempts to hand a copied pair to the kernel.
const LAST_RETRY: Duration = Duration::from_secs(10);

/// How often a half-close that waits for the kernel to drain is checked again. The waits
/// measured here took 2-600 us, so a millisecond keeps the close prompt.
const DRAIN_POLL: Duration = Duration::from_millis(1);

/// A half-close whose bytes the kernel has not moved for this long is given up on: the
/// peer's egress is not blocked (or we would see its queue), so the bytes were dropped.
const DRAIN_STALL_LIMIT: Duration = Duration::from_secs(10);

pub(super) struct Endpoint {
    pub fd: OwnedFd,
    pub cookie: Cookie,
    /// Set once the socket has been made non-blocking, which only copying needs.
    nonblocking: bool,
}

impl Endpoint {
    /// `nonblocking`: the socket is known to be non-blocking already.
    pub fn new(fd: OwnedFd, cookie: Cookie, nonblocking: bool) -> Endpoint {
        Endpoint {
            fd,
            cookie,
            nonblocking,
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Copying reads with [`socket::read`], which would wait on a blocking socket. A
    /// spliced socket is never switched: the kernel's redirect and the engine's other
    /// calls do not wait, and that spares a syscall per socket.
    fn make_nonblocking(&mut self) -> io::Result<()> {
        if !self.nonblocking {
            socket::set_nonblocking(self.fd())?;
            self.nonblocking = true;
        }
        Ok(())
    }
}

/// A pair copied for now, which the engine moves into the kernel once it shows it is
/// long: short exchanges cost less copied than spliced (benchmarks/connection-path.md).
///
/// The kernel may take a direction over only while this process holds none of its
/// bytes and has left no buffer of its source half-read (the kernel would redirect one
/// from its start, repeating what was copied): so from `at` on, each direction
/// drains its source (copy.rs, `CopyBuffer::drain`) and reads it no more, and the join
/// waits for both. A direction drained and left unread could hold up the other's peer
/// for good (a backend that reads the rest of a request only once its reply is
/// taken), so an attempt that has not joined within [`SWITCH_ATTEMPT`] of its start or
/// its last progress (bytes written, or a destination's queue shorter), or within
/// [`SWITCH_ATTEMPT_MAX`] in all, is given up and tried again later. Without the
/// progress, a sender faster than its reader kept both sides too full to drain within
/// 20 ms, and its stream was copied whole.
pub(super) struct SpliceLater {
    /// When the next attempt starts: brought forward to the first read that fills a
    /// full-size copy buffer.
    pub at: Instant,
    /// The PROXY header's length, written into the upstream before the first message.
    pub header: u64,
    /// The running attempt: when it started, and until when it may drain.
    attempt: Option<(Instant, Instant)>,
    /// How long after a failed attempt the next starts; doubles each time.
    retry: Duration,
}

impl SpliceLater {
    pub fn new(at: Instant, header: u64, retry: Duration) -> SpliceLater {
        SpliceLater {
            at,
            header,
            attempt: None,
            retry,
        }
    }

    /// Whether the directions drain now, starting an attempt or giving one up (counted
    /// in `given_up`).
    fn drains(&mut self, now: Instant, given_up: &mut u32) -> bool {
        if self.at > now {
            return false;
        }
        match self.attempt {
            None => {
                self.attempt = Some((now, now + SWITCH_ATTEMPT));
                true
            }
            Some((_, until)) if until > now => true,
            Some(_) => {
                self.attempt = None;
                *given_up += 1;
                self.at = now + self.retry;
                self.retry = (self.retry * 2).min(LAST_RETRY);
                false
            }
        }
    }

    /// The running attempt moved bytes: it may go on.
    fn progressed(&mut self, now: Instant) {
        if let Some((started, until)) = &mut self.attempt {
            *until = (now + SWITCH_ATTEMPT).min(*started + SWITCH_ATTEMPT_MAX);
        }
    }
}

/// Whether the kernel should take a [`SpliceLater`] pair over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Takeover {
    /// Now: both directions are drained (see [`Pair::takeover`]).
    Now,
    /// Look at the pair again at this time (an attempt starts, or is given up).
    At(Instant),
    /// The pair is not waiting to be spliced.
    NotNow,
}

/// What an event on one socket asks of a direction: an event concerns the direction
/// the socket is the source of and, if that direction waits for room, the one it is
/// the destination of. Looking at another would cost a read that finds nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    /// Nothing.
    Skip,
    /// Move what can move, reading a copied source until its queue is empty.
    Full,
    /// Its source reported bytes and no end: a copy's read that comes back short has
    /// emptied the queue (copy.rs, `CopyBuffer::pump`). Not after an end was reported:
    /// a FIN queued behind the bytes raises no edge of its own.
    Readable,
}

/// How a copied direction moves its bytes in one look.
#[derive(Debug, Clone, Copy)]
struct Copying {
    /// What it may read, at most (a buffer more): a copy that reaches it is looked at
    /// again at once.
    budget: u64,
    /// Drain the source for the kernel to take the direction over, and read it no
    /// more once it is drained ([`SpliceLater`]).
    drain: bool,
    /// A read that comes back short ends the look ([`Look::Readable`]).
    short_read_ends: bool,
}

/// Who moves a direction's bytes.
enum Mover {
    /// The probe redirects them, within the credit `KernelFlow` grants.
    Kernel(KernelFlow),
    Copy(CopyBuffer),
}

/// One direction: bytes received on `src` go out of `dst`.
struct Direction {
    /// The side `dst` is, for the log line of a pair that ends because it cannot send.
    to: Side,
    mover: Mover,
    /// Bytes this process read from the source (the first message, then any copying).
    consumed: u64,
    /// The source sent its FIN.
    eof: bool,
    /// Everything the source sent before its FIN has been written: only the FIN is
    /// left to pass on, by `shutdown(dst, SHUT_WR)` or by the close of a done pair.
    closed: bool,
    /// The FIN was passed on while the other direction was still open.
    fin_passed: bool,
    /// Last progress seen while waiting for the kernel to drain, to detect a stall.
    drain_progress: Option<(u64, Instant)>,
    /// Bytes the source sent in all, as the kernel counted them when a spliced
    /// direction's FIN arrived (the count is final then).
    source_total: Option<u64>,
}

/// What a pair needs from the worker after an event.
#[derive(Debug)]
pub(super) enum Next {
    /// Wait for the next event on either socket.
    Wait,
    /// A half-close or parked bytes wait for the kernel: look again at this time, or at
    /// the next event if it comes first.
    Poll(Instant),
    /// Both directions are closed.
    Done,
    /// A side reset or failed: the pair must be aborted.
    Reset(io::Error),
}

pub(super) struct Pair {
    pub client: Endpoint,
    pub upstream: Endpoint,
    to_upstream: Direction,
    to_client: Direction,
    pub info: ConnectionInfo,
    /// Counts the connection against its backend until the pair is torn down.
    pub lease: Option<Lease>,
    /// The pair's cookies are in the probe's maps and must be removed at teardown.
    pub in_maps: bool,
    /// The connection's places in the admission counts, given back at teardown.
    pub ticket: Ticket,
    /// The idle timeout and when the worker next looks at the pair's idleness.
    pub idle_check: Option<(Duration, Instant)>,
    /// When the worker looks at the pair next without an event (see [`Next::Poll`]).
    pub poll_due: Option<Instant>,
    /// The epoll interest registered for the client and the upstream.
    pub registered: [u32; 2],
    /// [`Pair::held`], [`Pair::throttles`] and `switches_given_up` as last added to
    /// the metrics ([`Pair::report`]).
    pub held_reported: u64,
    throttles_reported: u32,
    given_up_reported: u32,
    /// Set while the pair is copied until it shows it is long.
    pub splice_later: Option<SpliceLater>,
    /// Attempts to splice it given up so far. Kept here, not in [`SpliceLater`]: that
    /// goes when the pair starts to end, possibly in the look that gave an attempt up.
    switches_given_up: u32,
}

impl Pair {
    pub fn new(
        client: Endpoint,
        upstream: Endpoint,
        first_message_len: u64,
        ticket: Ticket,
        info: ConnectionInfo,
        lease: Option<Lease>,
    ) -> Pair {
        Pair {
            client,
            upstream,
            to_upstream: Direction::copied(Side::Upstream, first_message_len),
            to_client: Direction::copied(Side::Client, 0),
            info,
            lease,
            in_maps: false,
            ticket,
            idle_check: None,
            poll_due: None,
            registered: [0; 2],
            held_reported: 0,
            throttles_reported: 0,
            given_up_reported: 0,
            splice_later: None,
            switches_given_up: 0,
        }
    }

    /// Whether the engine should hand a pair it copies first to the kernel: once an
    /// attempt has drained both directions ([`SpliceLater`]) and neither source has
    /// ended. What arrives after the drain waits in the source's queue for the join's
    /// kick.
    pub fn takeover(&self) -> Takeover {
        let Some(later) = &self.splice_later else {
            return Takeover::NotNow;
        };
        match later.attempt {
            None => Takeover::At(later.at),
            Some(_) if self.to_upstream.is_drained() && self.to_client.is_drained() => {
                Takeover::Now
            }
            Some((_, until)) => Takeover::At(until),
        }
    }

    /// What this process has written into the client and into the upstream, counted as
    /// the kernel counts `bytes_written`, for a pair whose every read byte is written
    /// (see [`Pair::takeover`]): the bases a join measures the kernel's progress from.
    pub fn written_by_copy(&self, header: u64) -> (u64, u64) {
        (
            self.to_client.consumed,
            socket::dialed_bytes_written(header + self.to_upstream.consumed),
        )
    }

    /// Hands the client-to-upstream direction to the kernel with the credit `promise`
    /// covers; `upstream_written` is the upstream's `bytes_written` measured before the
    /// client joined the maps, and `client_buffer` the receive buffer the client joined
    /// with.
    pub fn kernel_moves_to_upstream(
        &mut self,
        upstream_written: u64,
        promise: Promise,
        client_buffer: usize,
    ) {
        self.to_upstream.mover = Mover::Kernel(KernelFlow::new(
            self.client.cookie,
            upstream_written,
            promise,
            client_buffer,
        ));
    }

    pub fn kernel_moves_to_client(
        &mut self,
        client_written: u64,
        promise: Promise,
        upstream_buffer: usize,
    ) {
        self.to_client.mover = Mover::Kernel(KernelFlow::new(
            self.upstream.cookie,
            client_written,
            promise,
            upstream_buffer,
        ));
    }

    /// The cookies of the sources whose directions have a credit record in the probe.
    pub fn credited_sources(&self) -> [Option<Cookie>; 2] {
        [
            (&self.to_upstream, self.client.cookie),
            (&self.to_client, self.upstream.cookie),
        ]
        .map(|(direction, cookie)| {
            direction
                .flow()
                .is_some_and(KernelFlow::has_credit_record)
                .then_some(cookie)
        })
    }

    /// The cookies of the sockets whose bytes the kernel moves, each with its side: the
    /// probe names a direction by its source's cookie when it asks for credit.
    pub fn kernel_sources(&self) -> impl Iterator<Item = (Cookie, Side)> + '_ {
        [
            (&self.to_upstream, self.client.cookie, Side::Client),
            (&self.to_client, self.upstream.cookie, Side::Upstream),
        ]
        .into_iter()
        .filter(|(direction, ..)| matches!(direction.mover, Mover::Kernel(_)))
        .map(|(_, cookie, side)| (cookie, side))
    }

    /// Times either direction parked for want of credit: the reader was slower than the
    /// sender by more than the backlog.
    pub fn throttles(&self) -> u32 {
        self.to_upstream.flow().map_or(0, KernelFlow::throttles)
            + self.to_client.flow().map_or(0, KernelFlow::throttles)
    }

    /// Adds to the metrics what changed since the last report: the bytes the kernel
    /// holds for the pair, its throttles, and the attempts to splice it given up
    /// because its directions did not drain ([`SpliceLater`]).
    pub fn report(&mut self, metrics: &Metrics) {
        let (held, throttles) = (self.held(), self.throttles());
        if held != self.held_reported {
            metrics.held(held as i64 - self.held_reported as i64);
            self.held_reported = held;
        }
        if throttles != self.throttles_reported {
            metrics.throttled(u64::from(throttles - self.throttles_reported));
            self.throttles_reported = throttles;
        }
        if self.switches_given_up != self.given_up_reported {
            metrics.switches_given_up(u64::from(self.switches_given_up - self.given_up_reported));
            self.given_up_reported = self.switches_given_up;
        }
    }

    /// Bytes the kernel holds for both directions beyond the sockets' own buffers, as
    /// last measured.
    pub fn held(&self) -> u64 {
        self.to_upstream.flow().map_or(0, KernelFlow::held)
            + self.to_client.flow().map_or(0, KernelFlow::held)
    }

    /// While the budget is tight, takes back what its idle directions in the kernel were
    /// promised (flow.rs, `KernelFlow::reclaim`).
    pub fn reclaim(&mut self, maps: &mut SpliceMaps) -> io::Result<()> {
        for (flow, dst) in self.kernel_flows() {
            flow.reclaim(maps, dst)?;
        }
        Ok(())
    }

    /// Starts moving what either direction parked without its ask reaching the engine
    /// (the probe's ring was full), and what follows from it.
    pub fn find_lost_parks(&mut self, maps: &mut SpliceMaps) -> Next {
        for (flow, dst) in self.kernel_flows() {
            if let Err(e) = flow.find_lost_park(maps, dst) {
                return Next::Reset(e);
            }
        }
        self.advance(Some(maps))
    }

    /// Each direction the kernel moves, with its destination socket.
    fn kernel_flows(&mut self) -> impl Iterator<Item = (&mut KernelFlow, BorrowedFd<'_>)> {
        [
            (&mut self.to_upstream, self.upstream.fd.as_fd()),
            (&mut self.to_client, self.client.fd.as_fd()),
        ]
        .into_iter()
        .filter_map(|(direction, dst)| match &mut direction.mover {
            Mover::Kernel(flow) => Some((flow, dst)),
            Mover::Copy(_) => None,
        })
    }

    /// The probe asked for credit for the direction whose source is `source`.
    pub fn on_ask(&mut self, source: Side, maps: &mut SpliceMaps) -> Next {
        let (direction, src, dst) = match source {
            Side::Client => (
                &mut self.to_upstream,
                self.client.fd.as_fd(),
                self.upstream.fd.as_fd(),
            ),
            Side::Upstream => (
                &mut self.to_client,
                self.upstream.fd.as_fd(),
                self.client.fd.as_fd(),
            ),
        };
        if let Mover::Kernel(flow) = &mut direction.mover
            && let Err(e) = flow.on_ask(maps, src, dst)
        {
            return Next::Reset(e);
        }
        self.advance(Some(maps))
    }

    /// Makes the sources of the directions this process copies non-blocking; call once
    /// the kernel has taken the directions it will take.
    pub fn prepare_copying(&mut self) -> io::Result<()> {
        if matches!(self.to_upstream.mover, Mover::Copy(_)) {
            self.client.make_nonblocking()?;
        }
        if matches!(self.to_client.mover, Mover::Copy(_)) {
            self.upstream.make_nonblocking()?;
        }
        Ok(())
    }

    /// Reads what the client has queued and writes it to the upstream, until a read
    /// returns less than it was offered: then no socket buffer is left half-read. The
    /// kernel redirects a half-read buffer again from its start, duplicating the bytes we
    /// read, so a pair may only be spliced once this returns true. False leaves the pair
    /// a consistent copy: the client is still streaming or half-closed, or the upstream
    /// is not taking more.
    pub fn settle_client_queue(&mut self) -> io::Result<bool> {
        const MAX_READS: usize = 16;
        let Pair {
            client,
            upstream,
            to_upstream: direction,
            ..
        } = self;
        let Mover::Copy(buffer) = &mut direction.mover else {
            return Ok(true);
        };
        // Usually nothing is queued: finding out costs no copy buffer and no switch to
        // non-blocking.
        match socket::peek_queued(client.fd(), &mut [0; 1]) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e.into()),
            _ => client.make_nonblocking()?,
        }
        let (client, upstream) = (client.fd(), upstream.fd());
        for _ in 0..MAX_READS {
            match buffer.read_once(client, upstream, &mut 0)? {
                Filled::Empty => return Ok(true),
                Filled::Eof => {
                    direction.eof = true;
                    return Ok(false);
                }
                Filled::Partly(n) | Filled::Full(n) if !buffer.is_empty() => {
                    direction.consumed += n as u64;
                    return Ok(false);
                }
                Filled::Partly(n) => {
                    direction.consumed += n as u64;
                    return Ok(true);
                }
                Filled::Full(n) => direction.consumed += n as u64,
            }
        }
        Ok(false)
    }

    /// Bytes this process read from the client and wrote to the upstream: the first
    /// message, and what settling the client's queue copied after it (all of it written
    /// once [`Pair::settle_client_queue`] returned true).
    pub fn forwarded(&self) -> u64 {
        self.to_upstream.consumed
    }

    pub fn mode(&self) -> Mode {
        if matches!(self.to_upstream.mover, Mover::Kernel(_))
            || matches!(self.to_client.mover, Mover::Kernel(_))
        {
            Mode::Splice
        } else {
            Mode::Copy
        }
    }

    /// Which epoll events a side needs: copied directions need readiness, kernel
    /// directions only the close.
    pub fn interest(&self, side: Side) -> u32 {
        let (reads, writes) = match side {
            Side::Client => (&self.to_upstream, &self.to_client),
            Side::Upstream => (&self.to_client, &self.to_upstream),
        };
        let mut interest = poll::READ_CLOSED;
        if reads.copies() {
            interest |= poll::READABLE;
        }
        if writes.copies() {
            interest |= poll::WRITABLE;
        }
        interest
    }

    /// Acts on the events epoll reported for one side.
    pub fn on_events(&mut self, side: Side, events: u32, maps: Option<&mut SpliceMaps>) -> Next {
        if events & poll::ERROR != 0 {
            let fd = match side {
                Side::Client => self.client.fd(),
                Side::Upstream => self.upstream.fd(),
            };
            match socket::take_error(fd) {
                // Verdict-only mode can raise a stale EPIPE right after we shut the
                // upstream's write side (docs/kernel.md, "A close, and the spurious error
                // that is not one"): not a close.
                Ok(None) => {}
                Ok(Some(e)) if e.raw_os_error() == Some(libc::EPIPE) => {}
                // No call of ours failed: the connection did. Named by where the error
                // was read and whose socket it is, it is not a bare errno in the log.
                Ok(Some(e)) => {
                    let error = format!("SO_ERROR on the {side}: {e}");
                    return Next::Reset(io::Error::new(e.kind(), error));
                }
                Err(e) => return Next::Reset(on_side(side, e)),
            }
        }
        if events & (poll::ERROR | poll::HANG_UP) != 0
            && let Some(error) = self.unsendable(side)
        {
            return Next::Reset(error);
        }
        let closed = events & (poll::READ_CLOSED | poll::HANG_UP) != 0;
        match side {
            Side::Client => {
                if closed {
                    self.to_upstream.eof_seen_by_kernel();
                }
            }
            Side::Upstream => {
                if closed {
                    self.to_client.eof_seen_by_kernel();
                }
            }
        }
        let into = match side {
            Side::Client => &self.to_client,
            Side::Upstream => &self.to_upstream,
        };
        let from = if events & (poll::READ_CLOSED | poll::HANG_UP | poll::ERROR) != 0 {
            Look::Full
        } else if events & poll::READABLE != 0 {
            Look::Readable
        } else {
            Look::Skip
        };
        let into = if events & (poll::HANG_UP | poll::ERROR) != 0
            || (events & poll::WRITABLE != 0 && into.waits_for_room())
        {
            Look::Full
        } else {
            Look::Skip
        };
        let looks = match side {
            Side::Client => [from, into],
            Side::Upstream => [into, from],
        };
        self.advance_some(maps, looks)
    }

    /// Why `side` can never take the bytes still owed to it, if it cannot: the
    /// connection ended under it while the direction into it is open. Its reset need not
    /// show as an error: once the kernel's redirect fails to send to a reset socket, its
    /// pending error is that send's EPIPE, which is ignored above, and every byte
    /// redirected to it after that is dropped. Waiting for the next FIN would wait for a
    /// drain that cannot happen.
    fn unsendable(&self, side: Side) -> Option<io::Error> {
        let (fd, into) = match side {
            Side::Client => (self.client.fd(), &self.to_client),
            Side::Upstream => (self.upstream.fd(), &self.to_upstream),
        };
        if into.closed {
            return None;
        }
        match socket::tcp_info(fd) {
            Ok(info) if info.is_closed() => Some(cannot_send(into.to, None)),
            Ok(_) => None,
            Err(e) => Some(on_side(into.to, e)),
        }
    }

    /// Moves whatever can move now in both directions and passes on finished closes.
    pub fn advance(&mut self, maps: Option<&mut SpliceMaps>) -> Next {
        self.advance_some(maps, [Look::Full, Look::Full])
    }

    /// [`Pair::advance`] with a [`Look`] for each direction, `[up, down]`.
    fn advance_some(&mut self, mut maps: Option<&mut SpliceMaps>, [up, down]: [Look; 2]) -> Next {
        // Parked bytes are read like copied ones: without waiting.
        if self.to_upstream.copies()
            && let Err(e) = self.client.make_nonblocking()
        {
            return Next::Reset(e);
        }
        if self.to_client.copies()
            && let Err(e) = self.upstream.make_nonblocking()
        {
            return Next::Reset(e);
        }
        let (client, upstream) = (self.client.fd.as_fd(), self.upstream.fd.as_fd());
        let (budget, drain) = match &mut self.splice_later {
            None => (u64::MAX, false),
            Some(later) => (
                COPY_FIRST_BUDGET,
                later.drains(Instant::now(), &mut self.switches_given_up),
            ),
        };
        let copying = |look: Look| Copying {
            budget,
            drain,
            short_read_ends: look == Look::Readable,
        };
        // Whether either direction moved bytes toward a switch to the kernel, which
        // keeps an attempt going.
        let mut progressed = false;
        let up = match up {
            Look::Skip => Ok(Next::Wait),
            look => self.to_upstream.advance(
                client,
                upstream,
                maps.as_deref_mut(),
                copying(look),
                &mut progressed,
            ),
        };
        let down = match down {
            Look::Skip => Ok(Next::Wait),
            look => self
                .to_client
                .advance(upstream, client, maps, copying(look), &mut progressed),
        };
        if let Some(later) = &mut self.splice_later {
            if drain && progressed {
                later.progressed(Instant::now());
            }
            let (up, down) = (&self.to_upstream, &self.to_client);
            if up.eof || down.eof {
                // An ending pair is copied to its end.
                self.splice_later = None;
            } else if !drain && (up.streams() || down.streams()) {
                later.at = later.at.min(Instant::now());
            }
        }
        match (up, down) {
            (Err(e), _) | (_, Err(e)) => Next::Reset(e),
            (Ok(up), Ok(down)) => {
                // Closing a done pair's sockets passes on the FINs not yet passed: a
                // short exchange, whose directions close in the same event, makes no
                // shutdown at all.
                if self.to_upstream.closed && self.to_client.closed {
                    return Next::Done;
                }
                let fins = self
                    .to_upstream
                    .pass_fin(upstream)
                    .and_then(|()| self.to_client.pass_fin(client));
                if let Err(e) = fins {
                    return Next::Reset(e);
                }
                match (up, down) {
                    (Next::Poll(a), Next::Poll(b)) => Next::Poll(a.min(b)),
                    (Next::Poll(at), _) | (_, Next::Poll(at)) => Next::Poll(at),
                    _ => Next::Wait,
                }
            }
        }
    }

    /// How long since either socket last sent or received data, by the kernel's clock:
    /// it sees the spliced bytes that this process never does. ACKs, window probes and
    /// keepalives are not data, so a pair whose reader stopped reading is idle.
    pub fn idle_for(&self) -> io::Result<Duration> {
        let mut idle_ms = u32::MAX;
        for fd in [self.client.fd(), self.upstream.fd()] {
            let info = socket::tcp_info(fd)?;
            idle_ms = idle_ms
                .min(info.last_data_recv_ms)
                .min(info.last_data_sent_ms);
        }
        Ok(Duration::from_millis(idle_ms.into()))
    }

    /// Bytes each side sent, for the access log: what a copied direction read up to
    /// the FIN, the kernel's count taken at a spliced direction's FIN, else the kernel's
    /// count asked now (a copy that ends before the FIN leaves bytes unread).
    pub fn bytes_sent(&self) -> (u64, u64) {
        let sent = |fd: BorrowedFd<'_>, direction: &Direction| match direction.source_total {
            Some(total) => total,
            None if direction.eof && matches!(direction.mover, Mover::Copy(_)) => {
                direction.consumed
            }
            None => socket::tcp_info(fd)
                .map(|info| info.bytes_received.saturating_sub(u64::from(direction.eof)))
                .unwrap_or(0),
        };
        (
            sent(self.client.fd(), &self.to_upstream),
            sent(self.upstream.fd(), &self.to_client),
        )
    }
}

impl Direction {
    fn copied(to: Side, consumed: u64) -> Direction {
        Direction {
            to,
            mover: Mover::Copy(CopyBuffer::default()),
            consumed,
            eof: false,
            closed: false,
            fin_passed: false,
            drain_progress: None,
            source_total: None,
        }
    }

    /// A copied direction learns of the FIN by reading 0 bytes, after reading what came
    /// before it; only a kernel direction has to take epoll's word for it.
    fn eof_seen_by_kernel(&mut self) {
        if matches!(self.mover, Mover::Kernel(_)) {
            self.eof = true;
        }
    }

    fn flow(&self) -> Option<&KernelFlow> {
        match &self.mover {
            Mover::Kernel(flow) => Some(flow),
            Mover::Copy(_) => None,
        }
    }

    /// A copied direction with nothing in hand, whose source's queue the last read
    /// emptied, and whose source has not ended.
    fn is_drained(&self) -> bool {
        !self.eof
            && !self.closed
            && matches!(&self.mover, Mover::Copy(buffer) if buffer.is_empty() && buffer.is_drained())
    }

    /// Whether the direction has bytes for its destination that it could not write:
    /// room there is what it waits for.
    fn waits_for_room(&self) -> bool {
        match &self.mover {
            Mover::Copy(buffer) => !buffer.is_empty(),
            Mover::Kernel(flow) => flow.is_throttled(),
        }
    }

    /// A copied direction whose last read filled a full-size buffer.
    fn streams(&self) -> bool {
        matches!(&self.mover, Mover::Copy(buffer) if buffer.streams())
    }

    /// Whether this process reads the source and writes the destination now: a copied
    /// direction always, a spliced one while it moves parked bytes.
    fn copies(&self) -> bool {
        match &self.mover {
            Mover::Copy(_) => true,
            Mover::Kernel(flow) => flow.is_throttled(),
        }
    }

    /// Moves what can move now; sets `switch_progressed` when it moved bytes toward a
    /// switch to the kernel (a drain, [`SpliceLater`]).
    fn advance(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        maps: Option<&mut SpliceMaps>,
        copying: Copying,
        switch_progressed: &mut bool,
    ) -> io::Result<Next> {
        if self.closed {
            return Ok(Next::Wait);
        }
        let drained = match &mut self.mover {
            Mover::Copy(buffer) if copying.drain => {
                // What is held goes first; a drained source is read no more.
                let mut written = 0;
                let all_written = buffer.write_all_now(dst, &mut written)?;
                *switch_progressed |= written > 0;
                if all_written && !buffer.is_drained() {
                    match buffer.drain(src, dst)? {
                        Drain::Moved(drained) => {
                            *switch_progressed |= drained.read > 0;
                            self.consumed += drained.read;
                            self.eof |= drained.eof;
                            if !self.eof && buffer.is_empty() && !buffer.is_drained() {
                                // More arrived than was queued when it looked: again.
                                return Ok(Next::Poll(Instant::now()));
                            }
                        }
                        Drain::NoRoom {
                            progressed,
                            look_in,
                        } => {
                            *switch_progressed |= progressed;
                            return Ok(Next::Poll(Instant::now() + look_in));
                        }
                    }
                }
                buffer.is_empty()
            }
            Mover::Copy(buffer) => {
                let pumped = buffer.pump(src, dst, copying.budget, copying.short_read_ends)?;
                self.consumed += pumped.read;
                self.eof |= pumped.eof;
                if pumped.read >= copying.budget && !pumped.eof {
                    return Ok(Next::Poll(Instant::now()));
                }
                buffer.is_empty()
            }
            Mover::Kernel(flow) => {
                let maps = maps.ok_or_else(|| {
                    io::Error::other("a spliced direction was advanced without the maps")
                })?;
                let unpark = flow.unthrottle(maps, src, dst)?;
                if !self.eof {
                    return Ok(match unpark {
                        Unpark::Flowing => Next::Wait,
                        Unpark::Waiting(at) => Next::Poll(at),
                    });
                }
                let owed = owed_after_fin(&mut self.source_total, self.consumed, src)?;
                if owed == 0 || flow.delivered(maps, dst, owed)? {
                    true
                } else {
                    let progress = flow.progress(dst)?;
                    // A reset destination keeps its unacknowledged bytes counted
                    // (SIOCOUTQ) for good, so the stall below would never give up on it.
                    if socket::tcp_info(dst)?.is_closed() {
                        return Err(cannot_send(self.to, Some(owed.saturating_sub(progress))));
                    }
                    if drain_stalled(&mut self.drain_progress, progress, dst)? {
                        tracing::warn!(
                            missing = owed.saturating_sub(progress),
                            "the kernel stopped moving a half-closed stream; passing the close on without the missing bytes"
                        );
                        true
                    } else {
                        let poll = Instant::now() + DRAIN_POLL;
                        return Ok(Next::Poll(match unpark {
                            Unpark::Waiting(at) => at.min(poll),
                            Unpark::Flowing => poll,
                        }));
                    }
                }
            }
        };
        if self.eof && drained {
            self.closed = true;
        }
        Ok(Next::Wait)
    }

    /// Passes the source's FIN on to the destination once everything before it is
    /// written.
    fn pass_fin(&mut self, dst: BorrowedFd<'_>) -> io::Result<()> {
        if self.closed && !self.fin_passed {
            socket::shutdown_write(dst).map_err(|e| on_side(self.to, e))?;
            self.fin_passed = true;
        }
        Ok(())
    }
}

/// The error that ends a pair whose destination `to` was reset or failed while the
/// direction into it was open; `missing` is what it still owed, when known.
fn cannot_send(to: Side, missing: Option<u64>) -> io::Error {
    let owed = match missing {
        Some(missing) => format!(", {missing} bytes still to send"),
        None => String::new(),
    };
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!(
            "the {to} connection was reset or failed before the proxy closed it (getsockopt(TCP_INFO): state CLOSE){owed}"
        ),
    )
}

/// `error`, from a call on the `side` socket, saying which side.
fn on_side(side: Side, error: SyscallError) -> io::Error {
    let SyscallError { call, io_error } = error;
    io::Error::new(io_error.kind(), format!("{call} on the {side}: {io_error}"))
}

/// Bytes the source sent after the kernel took over, up to its FIN: what must be in the
/// destination, redirected or unparked, before the FIN may be passed on (docs/kernel.md,
/// "The redirect is asynchronous"). `consumed` are the bytes read here before.
fn owed_after_fin(
    source_total: &mut Option<u64>,
    consumed: u64,
    src: BorrowedFd<'_>,
) -> io::Result<u64> {
    // The received count includes the FIN's sequence number, and is final: nothing
    // comes after a FIN, so the polls of a long drain read it once.
    let total = match *source_total {
        Some(total) => total,
        None => {
            let total = socket::tcp_info(src)?.bytes_received.saturating_sub(1);
            *source_total = Some(total);
            total
        }
    };
    Ok(total.saturating_sub(consumed))
}

/// Whether a half-close has waited too long: nothing moved for [`DRAIN_STALL_LIMIT`]
/// though the destination's peer has acknowledged everything (a blocked egress would
/// have unacknowledged bytes), so the kernel dropped the rest. `last` is the progress
/// seen before and since when.
fn drain_stalled(
    last: &mut Option<(u64, Instant)>,
    progress: u64,
    dst: BorrowedFd<'_>,
) -> io::Result<bool> {
    let now = Instant::now();
    match *last {
        Some((seen, since)) if seen == progress => {
            Ok(now.duration_since(since) > DRAIN_STALL_LIMIT && socket::unacked_bytes(dst)? == 0)
        }
        _ => {
            *last = Some((progress, now));
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{self, Read, Write},
        net::{Ipv4Addr, Shutdown, TcpListener, TcpStream, UdpSocket},
        os::fd::{AsFd, OwnedFd},
        sync::Arc,
        thread,
        time::{Duration, Instant},
    };

    use super::{
        ConnectionInfo, Cookie, DRAIN_STALL_LIMIT, Direction, Endpoint, KernelFlow, Mode, Mover,
        Next, Pair, Promise, SWITCH_ATTEMPT, SWITCH_ATTEMPT_MAX, Side, SpliceLater, Ticket,
        drain_stalled, owed_after_fin, poll,
    };
    use crate::{
        socket::{self, connected},
        splice::flow::FIRST_RECEIVE_BUFFER,
    };

    /// An attempt to splice goes on for [`SWITCH_ATTEMPT`] past its start or its last
    /// progress, never past [`SWITCH_ATTEMPT_MAX`]; given up, the next starts after the
    /// retry delay, which doubles.
    #[test]
    fn an_attempt_goes_on_while_it_moves_up_to_its_limit() {
        let ms = Duration::from_millis;
        let start = Instant::now();
        let mut later = SpliceLater::new(start, 0, ms(100));
        let mut given_up = 0;
        assert!(
            later.drains(start, &mut given_up),
            "the attempt starts when its time comes"
        );
        assert!(later.drains(start + SWITCH_ATTEMPT - ms(1), &mut given_up));
        let mut now = start + SWITCH_ATTEMPT / 2;
        while now < start + SWITCH_ATTEMPT_MAX {
            later.progressed(now);
            assert!(
                later.drains(now, &mut given_up),
                "an attempt that moved was given up"
            );
            now += SWITCH_ATTEMPT / 2;
        }
        let over = start + SWITCH_ATTEMPT_MAX + ms(1);
        assert!(
            !later.drains(over, &mut given_up),
            "an attempt went on past its limit"
        );
        assert_eq!(later.at, over + ms(100));
        assert_eq!(given_up, 1);

        let second = later.at;
        assert!(later.drains(second, &mut given_up));
        let stalled = second + SWITCH_ATTEMPT + ms(1);
        assert!(
            !later.drains(stalled, &mut given_up),
            "an attempt that never moved went on"
        );
        assert_eq!(
            later.at,
            stalled + ms(200),
            "the retry delay did not double"
        );
        assert_eq!(given_up, 2);
    }

    /// A copied pair (no probe) and its two peers: `client` talks to the pair's client
    /// socket, `backend` to its upstream socket. The cookies are 1 and 2.
    struct Proxied {
        pair: Pair,
        client: TcpStream,
        backend: TcpStream,
    }

    fn proxied() -> Proxied {
        let (backend, upstream) = connected();
        proxied_to(backend, upstream)
    }

    /// A pair whose upstream fills after a few dozen KiB: small fixed buffers on the
    /// upstream and its backend, the backend's set before it connects.
    fn proxied_to_a_small_backend() -> Proxied {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let backend =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        backend.set_recv_buffer_size(8 * 1024).unwrap();
        backend
            .connect(&listener.local_addr().unwrap().into())
            .unwrap();
        let (upstream, _) = listener.accept().unwrap();
        socket2::SockRef::from(&upstream)
            .set_send_buffer_size(8 * 1024)
            .unwrap();
        proxied_to(backend.into(), upstream)
    }

    fn proxied_to(backend: TcpStream, upstream: TcpStream) -> Proxied {
        let (client_side, client) = connected();
        let info = ConnectionInfo {
            client: client.local_addr().unwrap(),
            route: Arc::from("test"),
            backend: backend.local_addr().unwrap(),
            accepted: Instant::now(),
        };
        let pair = Pair::new(
            Endpoint::new(OwnedFd::from(client_side), Cookie::fake(1), false),
            Endpoint::new(OwnedFd::from(upstream), Cookie::fake(2), false),
            0,
            Ticket::default(),
            info,
            None,
        );
        Proxied {
            pair,
            client,
            backend,
        }
    }

    /// Advances the pair, as a worker would on each event, until `done` holds.
    fn advance_until(pair: &mut Pair, done: impl Fn(&Pair, &Next) -> bool) -> Next {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let next = pair.advance(None);
            if done(pair, &next) {
                return next;
            }
            if let Next::Reset(e) = next {
                panic!("the pair was reset: {e}");
            }
            assert!(Instant::now() < deadline, "the pair never got there");
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn buffered(direction: &Direction) -> bool {
        matches!(&direction.mover, Mover::Copy(buffer) if !buffer.is_empty())
    }

    /// Waits until `socket`'s peer's FIN has arrived.
    fn wait_for_fin(socket: impl AsFd) {
        let epoll = poll::Epoll::new().unwrap();
        epoll.add(socket.as_fd(), poll::READ_CLOSED, 0).unwrap();
        let mut events = Vec::with_capacity(1);
        epoll
            .wait(&mut events, Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(events.len(), 1, "the FIN never came");
    }

    /// Waits until the kernel has taken `socket`'s connection to CLOSE (a reset).
    fn wait_closed(socket: impl AsFd) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket::tcp_info(socket.as_fd()).unwrap().is_closed() {
            assert!(Instant::now() < deadline, "the reset never came");
            thread::sleep(Duration::from_millis(1));
        }
    }

    fn reset(stream: TcpStream) {
        socket::reset_on_close(stream.as_fd()).unwrap();
        drop(stream);
    }

    #[test]
    fn a_copied_pair_moves_bytes_both_ways_and_counts_what_it_read() {
        let Proxied {
            mut pair,
            mut client,
            mut backend,
        } = proxied();
        client.write_all(b"GET /").unwrap();
        backend.write_all(b"200 OK").unwrap();
        let next = advance_until(&mut pair, |pair, _| {
            (pair.to_upstream.consumed, pair.to_client.consumed) == (5, 6)
        });
        assert!(matches!(next, Next::Wait), "{next:?}");
        let (mut up, mut down) = ([0; 5], [0; 6]);
        backend.read_exact(&mut up).unwrap();
        client.read_exact(&mut down).unwrap();
        assert_eq!((&up, &down), (b"GET /", b"200 OK"));
        assert!(!pair.to_upstream.closed && !pair.to_client.closed);
    }

    #[test]
    fn the_fin_is_passed_on_only_after_every_byte_before_it() {
        let Proxied {
            mut pair,
            mut client,
            backend,
        } = proxied_to_a_small_backend();
        let sent: Vec<u8> = (0..60 * 1024).map(|i| (i % 251) as u8).collect();
        client.write_all(&sent).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        // The backend reads nothing: the pair holds bytes it cannot write yet, with the
        // client's FIN queued behind them.
        advance_until(&mut pair, |pair, _| buffered(&pair.to_upstream));
        for _ in 0..10 {
            assert!(matches!(pair.advance(None), Next::Wait));
            assert!(!pair.to_upstream.closed, "closed with bytes still to write");
            thread::sleep(Duration::from_millis(1));
        }
        let reader = thread::spawn(move || {
            let mut received = Vec::new();
            (&backend).read_to_end(&mut received).unwrap();
            received
        });
        let next = advance_until(&mut pair, |pair, _| pair.to_upstream.closed);
        // The other direction is still open.
        assert!(matches!(next, Next::Wait), "{next:?}");
        assert!(
            reader.join().unwrap() == sent,
            "the backend did not get every byte"
        );
        assert_eq!(pair.to_upstream.consumed, sent.len() as u64);
    }

    #[test]
    fn a_half_close_leaves_the_other_direction_open_until_it_closes_too() {
        let Proxied {
            mut pair,
            mut client,
            mut backend,
        } = proxied();
        client.write_all(b"bye").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let next = advance_until(&mut pair, |pair, _| pair.to_upstream.closed);
        assert!(matches!(next, Next::Wait), "{next:?}");
        let mut request = Vec::new();
        backend.read_to_end(&mut request).unwrap();
        assert_eq!(request, b"bye");

        backend.write_all(b"reply").unwrap();
        backend.shutdown(Shutdown::Write).unwrap();
        let next = advance_until(&mut pair, |_, next| !matches!(next, Next::Wait));
        assert!(matches!(next, Next::Done), "{next:?}");
        // Each side's bytes, as the access log gives them: without the FIN.
        assert_eq!(pair.bytes_sent(), (3, 5));
        // A done pair's close passes the last FIN on.
        drop(pair);
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"reply");
    }

    #[test]
    fn a_peer_reset_resets_the_pair() {
        let Proxied {
            mut pair,
            client,
            backend: _backend,
        } = proxied();
        reset(client);
        let next = advance_until(&mut pair, |_, next| matches!(next, Next::Reset(_)));
        let Next::Reset(e) = next else { unreachable!() };
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    }

    #[test]
    fn an_error_event_resets_the_pair_naming_the_side_and_its_error() {
        let Proxied {
            mut pair,
            client,
            backend: _backend,
        } = proxied();
        reset(client);
        wait_closed(&pair.client.fd);
        let next = pair.on_events(Side::Client, poll::ERROR, None);
        let Next::Reset(e) = next else {
            panic!("{next:?}")
        };
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        assert!(e.to_string().starts_with("SO_ERROR on the client: "), "{e}");
    }

    #[test]
    fn a_hang_up_of_a_side_still_owed_bytes_resets_the_pair_naming_it() {
        let Proxied {
            mut pair,
            client: _client,
            backend,
        } = proxied();
        reset(backend);
        wait_closed(&pair.upstream.fd);
        let next = pair.on_events(Side::Upstream, poll::HANG_UP, None);
        let Next::Reset(e) = next else {
            panic!("{next:?}")
        };
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        assert!(
            e.to_string()
                .starts_with("the upstream connection was reset"),
            "{e}"
        );
    }

    #[test]
    fn a_copied_direction_takes_its_end_from_the_read_not_from_epoll() {
        let Proxied {
            mut pair,
            mut client,
            mut backend,
        } = proxied();
        // Epoll's word for a close: a copied direction must not pass it on unread.
        let next = pair.on_events(Side::Client, poll::READ_CLOSED, None);
        assert!(matches!(next, Next::Wait), "{next:?}");
        assert!(!pair.to_upstream.eof && !pair.to_upstream.closed);
        client.write_all(b"more").unwrap();
        advance_until(&mut pair, |pair, _| pair.to_upstream.consumed == 4);
        let mut more = [0; 4];
        backend.read_exact(&mut more).unwrap();
        assert_eq!(&more, b"more");

        // A spliced direction can only take epoll's word for it.
        let mut spliced = Direction::copied(Side::Upstream, 0);
        spliced.mover = Mover::Kernel(KernelFlow::new(
            Cookie::fake(1),
            0,
            Promise::for_tests(),
            FIRST_RECEIVE_BUFFER,
        ));
        spliced.eof_seen_by_kernel();
        assert!(spliced.eof);
    }

    #[test]
    fn a_spliced_direction_needs_only_the_close_from_its_source() {
        let Proxied { mut pair, .. } = proxied();
        let all = poll::READ_CLOSED | poll::READABLE | poll::WRITABLE;
        assert_eq!(
            (pair.interest(Side::Client), pair.interest(Side::Upstream)),
            (all, all)
        );
        assert_eq!(pair.mode(), Mode::Copy);
        assert_eq!(pair.kernel_sources().count(), 0);

        pair.kernel_moves_to_upstream(0, Promise::for_tests(), FIRST_RECEIVE_BUFFER);
        assert_eq!(
            pair.interest(Side::Client),
            poll::READ_CLOSED | poll::WRITABLE
        );
        assert_eq!(
            pair.interest(Side::Upstream),
            poll::READ_CLOSED | poll::READABLE
        );
        assert_eq!(pair.mode(), Mode::Splice);
        assert_eq!(
            pair.kernel_sources().collect::<Vec<_>>(),
            [(Cookie::fake(1), Side::Client)]
        );
        // No credit was granted: nothing to delete from the probe's maps.
        assert_eq!(pair.credited_sources(), [None, None]);

        pair.kernel_moves_to_client(0, Promise::for_tests(), FIRST_RECEIVE_BUFFER);
        assert_eq!(
            (pair.interest(Side::Client), pair.interest(Side::Upstream)),
            (poll::READ_CLOSED, poll::READ_CLOSED)
        );
        assert_eq!(
            pair.kernel_sources().collect::<Vec<_>>(),
            [
                (Cookie::fake(1), Side::Client),
                (Cookie::fake(2), Side::Upstream)
            ]
        );
    }

    #[test]
    fn settling_a_quiet_client_reads_nothing_and_leaves_it_blocking() {
        // The peers stay open: a closed client would be read for its end.
        let Proxied {
            mut pair,
            client: _client,
            backend: _backend,
        } = proxied();
        assert!(pair.settle_client_queue().unwrap());
        assert!(!pair.client.nonblocking);
        assert_eq!(pair.to_upstream.consumed, 0);
    }

    #[test]
    fn settling_forwards_what_the_client_queued_before_the_splice() {
        let Proxied {
            mut pair,
            mut client,
            mut backend,
        } = proxied();
        client.write_all(b"pipelined").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while socket::peek_queued(pair.client.fd(), &mut [0; 9]).unwrap_or(0) < 9 {
            assert!(Instant::now() < deadline, "the bytes never arrived");
            thread::sleep(Duration::from_millis(1));
        }
        assert!(pair.settle_client_queue().unwrap());
        assert_eq!(pair.forwarded(), 9);
        // The engine's base for a dialed upstream counts what settling copied.
        assert_eq!(
            socket::settled_bytes_written(pair.upstream.fd()).unwrap(),
            socket::dialed_bytes_written(pair.forwarded())
        );
        let mut forwarded = [0; 9];
        backend.read_exact(&mut forwarded).unwrap();
        assert_eq!(&forwarded, b"pipelined");
    }

    #[test]
    fn settling_a_client_that_closed_refuses_the_splice_and_passes_its_end_on() {
        let Proxied {
            mut pair,
            client,
            mut backend,
        } = proxied();
        client.shutdown(Shutdown::Write).unwrap();
        wait_for_fin(&pair.client.fd);
        assert!(!pair.settle_client_queue().unwrap());
        assert!(pair.to_upstream.eof);
        advance_until(&mut pair, |pair, _| pair.to_upstream.closed);
        let mut rest = Vec::new();
        backend.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn idle_for_is_the_time_since_either_socket_last_moved_data() {
        let Proxied {
            mut pair,
            mut client,
            mut backend,
        } = proxied();
        client.write_all(b"x").unwrap();
        advance_until(&mut pair, |pair, _| pair.to_upstream.consumed == 1);
        backend.read_exact(&mut [0]).unwrap();
        thread::sleep(Duration::from_millis(300));
        let idle = pair.idle_for().unwrap();
        // The kernel's clock ticks in jiffies: a few milliseconds either way.
        assert!(idle >= Duration::from_millis(280), "{idle:?}");
        assert!(idle < Duration::from_secs(10), "{idle:?}");
        backend.write_all(b"y").unwrap();
        advance_until(&mut pair, |pair, _| pair.to_client.consumed == 1);
        let idle_after = pair.idle_for().unwrap();
        assert!(
            idle_after < idle - Duration::from_millis(200),
            "{idle_after:?}"
        );
    }

    #[test]
    fn a_fin_owes_the_sources_total_less_what_was_read_here_and_counts_it_once() {
        let (src, mut sender) = connected();
        sender.write_all(&[0; 1000]).unwrap();
        sender.shutdown(Shutdown::Write).unwrap();
        wait_for_fin(&src);
        let mut total = None;
        assert_eq!(owed_after_fin(&mut total, 200, src.as_fd()).unwrap(), 800);
        // The FIN's sequence number is not a byte.
        assert_eq!(total, Some(1000));
        // Final once known: no socket is asked again (a UDP one could not answer).
        let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        assert_eq!(owed_after_fin(&mut total, 300, udp.as_fd()).unwrap(), 700);
        assert_eq!(owed_after_fin(&mut total, 1200, udp.as_fd()).unwrap(), 0);
    }

    #[test]
    fn a_drain_stalls_only_after_the_limit_without_progress_or_unacknowledged_bytes() {
        let (dst, _peer) = connected();
        let mut last = None;
        assert!(!drain_stalled(&mut last, 5, dst.as_fd()).unwrap());
        assert!(matches!(last, Some((5, _))));
        // Progress restarts the clock.
        assert!(!drain_stalled(&mut last, 6, dst.as_fd()).unwrap());
        assert!(matches!(last, Some((6, _))));
        assert!(!drain_stalled(&mut last, 6, dst.as_fd()).unwrap());
        let long_ago = Instant::now() - DRAIN_STALL_LIMIT - Duration::from_secs(1);
        last = Some((6, long_ago));
        assert!(!drain_stalled(&mut last, 7, dst.as_fd()).unwrap());
        last = Some((6, long_ago));
        assert!(drain_stalled(&mut last, 6, dst.as_fd()).unwrap());
    }

    #[test]
    fn a_drain_with_bytes_unacknowledged_is_not_stalled() {
        let (dst, _peer) = connected();
        // The peer reads nothing: fill its window until our bytes queue unacknowledged.
        dst.set_nonblocking(true).unwrap();
        while socket::write(dst.as_fd(), &[0; 64 * 1024]).is_ok() {}
        assert!(socket::unacked_bytes(dst.as_fd()).unwrap() > 0);
        let long_ago = Instant::now() - DRAIN_STALL_LIMIT - Duration::from_secs(1);
        let mut last = Some((6, long_ago));
        assert!(!drain_stalled(&mut last, 6, dst.as_fd()).unwrap());
    }
}
