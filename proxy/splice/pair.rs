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
    copy::{CopyBuffer, Filled},
    flow::{KernelFlow, Unpark},
    poll,
};
use crate::{
    admission::Ticket,
    backend::Lease,
    ending::{ConnectionInfo, Mode},
    probe::SpliceMaps,
    socket::{self, SyscallError},
};

/// How often a half-close that waits for the kernel to drain is checked again. The waits
/// measured here took 2-600 us, so a millisecond keeps the close prompt.
const DRAIN_POLL: Duration = Duration::from_millis(1);

/// A half-close whose bytes the kernel has not moved for this long is given up on: the
/// peer's egress is not blocked (or we would see its queue), so the bytes were dropped.
const DRAIN_STALL_LIMIT: Duration = Duration::from_secs(10);

pub(super) struct Endpoint {
    pub fd: OwnedFd,
    pub cookie: u64,
    /// Set once the socket has been made non-blocking, which only copying needs.
    nonblocking: bool,
}

impl Endpoint {
    /// `nonblocking`: the socket is known to be non-blocking already.
    pub fn new(fd: OwnedFd, cookie: u64, nonblocking: bool) -> Endpoint {
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
    /// Everything has been written and the FIN passed on (`shutdown(dst, SHUT_WR)`).
    closed: bool,
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
    /// [`Pair::held`] and [`Pair::throttles`] as last added to the metrics.
    pub held_reported: u64,
    pub throttles_reported: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Side {
    Client,
    Upstream,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
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
        }
    }

    /// Hands the client-to-upstream direction to the kernel; `upstream_written` is the
    /// upstream's `bytes_written` measured before the client joined the maps.
    pub fn kernel_moves_to_upstream(&mut self, upstream_written: u64) {
        self.to_upstream.mover =
            Mover::Kernel(KernelFlow::new(self.client.cookie, upstream_written));
    }

    pub fn kernel_moves_to_client(&mut self, client_written: u64) {
        self.to_client.mover = Mover::Kernel(KernelFlow::new(self.upstream.cookie, client_written));
    }

    /// The cookies of the sources whose directions have a credit record in the probe.
    pub fn credited_sources(&self) -> [Option<u64>; 2] {
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
    pub fn kernel_sources(&self) -> impl Iterator<Item = (u64, Side)> + '_ {
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

    /// Bytes the kernel holds for both directions beyond the sockets' own buffers, as
    /// last measured.
    pub fn held(&self) -> u64 {
        self.to_upstream.flow().map_or(0, KernelFlow::held)
            + self.to_client.flow().map_or(0, KernelFlow::held)
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
            match buffer.read_once(client)? {
                Filled::Empty => return Ok(true),
                Filled::Eof => {
                    direction.eof = true;
                    return Ok(false);
                }
                Filled::Partly(n) | Filled::Full(n)
                    if !buffer.write_all_now(upstream, &mut 0)? =>
                {
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
                    let error = format!("SO_ERROR on the {}: {e}", side.as_str());
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
        self.advance(maps)
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
    pub fn advance(&mut self, mut maps: Option<&mut SpliceMaps>) -> Next {
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
        let up = self
            .to_upstream
            .advance(client, upstream, maps.as_deref_mut());
        let down = self.to_client.advance(upstream, client, maps);
        match (up, down) {
            (Err(e), _) | (_, Err(e)) => Next::Reset(e),
            (Ok(up), Ok(down)) => {
                if self.to_upstream.closed && self.to_client.closed {
                    return Next::Done;
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

    /// Bytes each side sent, by the kernel's count, for the access log: the count taken
    /// at a spliced direction's FIN, else asked now.
    pub fn bytes_sent(&self) -> (u64, u64) {
        let sent = |fd: BorrowedFd<'_>, direction: &Direction| match direction.source_total {
            Some(total) => total,
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

    /// Whether this process reads the source and writes the destination now: a copied
    /// direction always, a spliced one while it moves parked bytes.
    fn copies(&self) -> bool {
        match &self.mover {
            Mover::Copy(_) => true,
            Mover::Kernel(flow) => flow.is_throttled(),
        }
    }

    fn advance(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        maps: Option<&mut SpliceMaps>,
    ) -> io::Result<Next> {
        if self.closed {
            return Ok(Next::Wait);
        }
        let drained = match &mut self.mover {
            Mover::Copy(buffer) => {
                let pumped = buffer.pump(src, dst, u64::MAX)?;
                self.consumed += pumped.read;
                self.eof |= pumped.eof;
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
            socket::shutdown_write(dst).map_err(|e| on_side(self.to, e))?;
            self.closed = true;
        }
        Ok(Next::Wait)
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
            "the {} connection was reset or failed before the proxy closed it (getsockopt(TCP_INFO): state CLOSE){owed}",
            to.as_str()
        ),
    )
}

/// `error`, from a call on the `side` socket, saying which side.
fn on_side(side: Side, error: SyscallError) -> io::Error {
    let SyscallError { call, io_error } = error;
    io::Error::new(
        io_error.kind(),
        format!("{call} on the {}: {io_error}", side.as_str()),
    )
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
