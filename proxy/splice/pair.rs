//! One proxied connection after its first message: the two sockets and, for each
//! direction, whether the kernel or this process moves its bytes, and how far its close
//! has got. A direction's egress has exactly one writer (the kernel's redirect or our
//! copy, never both), so bytes cannot overtake each other.

use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    time::{Duration, Instant},
};

use super::{ConnectionInfo, Mode, poll};
use crate::{admission::Ticket, backend::Lease, socket};

/// A userspace copy moves at most this much per read: large enough for a fast stream,
/// small enough that thousands of copied connections stay cheap.
const COPY_BUFFER: usize = 64 * 1024;

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
    pub fn new(fd: OwnedFd, cookie: u64) -> Endpoint {
        Endpoint {
            fd,
            cookie,
            nonblocking: false,
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
    /// The probe redirects them. `base` is the destination's `bytes_written` when the
    /// kernel took over: from then on every byte written into it came from the redirect.
    Kernel {
        base: u64,
    },
    Copy(CopyBuffer),
}

struct CopyBuffer {
    bytes: Box<[u8]>,
    start: usize,
    end: usize,
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
    /// A half-close is waiting for the kernel to finish moving bytes: check again soon.
    Poll,
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
        }
    }

    /// Hands the client-to-upstream direction to the kernel; `upstream_written` is the
    /// upstream's `bytes_written` measured before the client joined the maps.
    pub fn kernel_moves_to_upstream(&mut self, upstream_written: u64) {
        self.to_upstream.mover = Mover::Kernel {
            base: upstream_written,
        };
    }

    pub fn kernel_moves_to_client(&mut self, client_written: u64) {
        self.to_client.mover = Mover::Kernel {
            base: client_written,
        };
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
            Err(e) if e.kind() != io::ErrorKind::Interrupted => return Err(e),
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
                Filled::Partly(n) | Filled::Full(n) if !buffer.write_all_now(upstream)? => {
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
        if matches!(self.to_upstream.mover, Mover::Kernel { .. })
            || matches!(self.to_client.mover, Mover::Kernel { .. })
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
        if matches!(reads.mover, Mover::Copy(_)) {
            interest |= poll::READABLE;
        }
        if matches!(writes.mover, Mover::Copy(_)) {
            interest |= poll::WRITABLE;
        }
        interest
    }

    /// Acts on the events epoll reported for one side.
    pub fn on_events(&mut self, side: Side, events: u32) -> Next {
        if events & poll::ERROR != 0 {
            let fd = match side {
                Side::Client => self.client.fd(),
                Side::Upstream => self.upstream.fd(),
            };
            match socket::take_error(fd) {
                // Verdict-only mode can raise a stale EPIPE right after we shut the
                // upstream's write side (KERNEL-NOTES pitfall 3): not a close.
                Ok(None) => {}
                Ok(Some(e)) if e.raw_os_error() == Some(libc::EPIPE) => {}
                Ok(Some(e)) | Err(e) => return Next::Reset(e),
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
        self.advance()
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
            Ok(info) if info.is_closed() => Some(into.cannot_send(None)),
            Ok(_) => None,
            Err(e) => Some(named("getsockopt(TCP_INFO)", into.to, e)),
        }
    }

    /// Moves whatever can move now in both directions and passes on finished closes.
    pub fn advance(&mut self) -> Next {
        let (client, upstream) = (self.client.fd.as_fd(), self.upstream.fd.as_fd());
        let up = self.to_upstream.advance(client, upstream);
        let down = self.to_client.advance(upstream, client);
        match (up, down) {
            (Err(e), _) | (_, Err(e)) => Next::Reset(e),
            (Ok(up), Ok(down)) => {
                if self.to_upstream.closed && self.to_client.closed {
                    Next::Done
                } else if matches!(up, Next::Poll) || matches!(down, Next::Poll) {
                    Next::Poll
                } else {
                    Next::Wait
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
            mover: Mover::Copy(CopyBuffer {
                bytes: Box::default(),
                start: 0,
                end: 0,
            }),
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
        if matches!(self.mover, Mover::Kernel { .. }) {
            self.eof = true;
        }
    }

    fn advance(&mut self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> io::Result<Next> {
        if self.closed {
            return Ok(Next::Wait);
        }
        let drained = match &mut self.mover {
            Mover::Copy(buffer) => {
                let (moved, eof) = buffer.pump(src, dst)?;
                self.consumed += moved;
                self.eof |= eof;
                buffer.start == buffer.end
            }
            Mover::Kernel { base } => {
                if !self.eof {
                    return Ok(Next::Wait);
                }
                let base = *base;
                match self.kernel_drained(src, dst, base)? {
                    true => true,
                    false => return Ok(Next::Poll),
                }
            }
        };
        if self.eof && drained {
            socket::shutdown_write(dst).map_err(|e| named("shutdown(SHUT_WR)", self.to, e))?;
            self.closed = true;
        }
        Ok(Next::Wait)
    }

    /// Whether the kernel has written into `dst` every byte `src` received before its FIN
    /// that we did not read ourselves. The redirect is asynchronous, so the FIN must not
    /// be passed on before this holds (KERNEL-NOTES pitfall 2).
    fn kernel_drained(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        base: u64,
    ) -> io::Result<bool> {
        // The received count includes the FIN's sequence number, and is final: nothing
        // comes after a FIN, so the polls of a long drain read it once.
        let total = match self.source_total {
            Some(total) => total,
            None => {
                let total = socket::tcp_info(src)?.bytes_received.saturating_sub(1);
                self.source_total = Some(total);
                total
            }
        };
        let owed = total.saturating_sub(self.consumed);
        if owed == 0 {
            // We read it all ourselves (often the first message was all): no need to ask
            // how far the kernel got.
            return Ok(true);
        }
        let (written, info) = socket::written_and_info(dst)?;
        let moved = written.saturating_sub(base);
        if moved >= owed {
            return Ok(true);
        }
        // A reset destination keeps its unacknowledged bytes counted (SIOCOUTQ) for good,
        // so the stall below would never give up on it.
        if info.is_closed() {
            return Err(self.cannot_send(Some(owed - moved)));
        }
        let now = Instant::now();
        match self.drain_progress {
            Some((seen, since)) if seen == moved => {
                if now.duration_since(since) > DRAIN_STALL_LIMIT && socket::unacked_bytes(dst)? == 0
                {
                    tracing::warn!(
                        missing = owed - moved,
                        "the kernel stopped moving a half-closed stream; passing the close on without the missing bytes"
                    );
                    return Ok(true);
                }
            }
            _ => self.drain_progress = Some((moved, now)),
        }
        Ok(false)
    }

    /// The error that ends a pair whose destination `self.to` was reset or failed while
    /// this direction was open; `missing` is what it still owed, when known.
    fn cannot_send(&self, missing: Option<u64>) -> io::Error {
        let owed = match missing {
            Some(missing) => format!(", {missing} bytes still to send"),
            None => String::new(),
        };
        io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!(
                "the {} connection was reset or failed before the proxy closed it (getsockopt(TCP_INFO): state CLOSE){owed}",
                self.to.as_str()
            ),
        )
    }
}

/// `error` from `call` on the `side` socket, saying so.
fn named(call: &str, side: Side, error: io::Error) -> io::Error {
    io::Error::new(
        error.kind(),
        format!("{call} on the {}: {error}", side.as_str()),
    )
}

/// What one read into a [`CopyBuffer`] found.
enum Filled {
    /// Nothing queued (EAGAIN).
    Empty,
    Eof,
    /// Fewer bytes than offered: the receive queue is now empty.
    Partly(usize),
    /// As many as offered: more may be queued.
    Full(usize),
}

impl CopyBuffer {
    fn allocate(&mut self) {
        if self.bytes.is_empty() {
            self.bytes = vec![0; COPY_BUFFER].into_boxed_slice();
        }
    }

    /// One read into the (empty) buffer.
    fn read_once(&mut self, src: BorrowedFd<'_>) -> io::Result<Filled> {
        self.allocate();
        loop {
            return match socket::read(src, &mut self.bytes) {
                Ok(0) => Ok(Filled::Eof),
                Ok(n) => {
                    (self.start, self.end) = (0, n);
                    Ok(if n < self.bytes.len() {
                        Filled::Partly(n)
                    } else {
                        Filled::Full(n)
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Filled::Empty),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
        }
    }

    /// Writes the buffered bytes; false if `dst` would block before all were written
    /// (what is left stays buffered).
    fn write_all_now(&mut self, dst: BorrowedFd<'_>) -> io::Result<bool> {
        while self.start < self.end {
            match socket::write(dst, &self.bytes[self.start..self.end]) {
                Ok(n) => self.start += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        (self.start, self.end) = (0, 0);
        Ok(true)
    }

    /// Reads from `src` and writes to `dst` until one of them would block, or the source
    /// ended and everything read was written. Returns the bytes read and whether the
    /// source ended.
    fn pump(&mut self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> io::Result<(u64, bool)> {
        let mut read_total = 0u64;
        while self.write_all_now(dst)? {
            match self.read_once(src)? {
                Filled::Empty => break,
                Filled::Eof => return Ok((read_total, true)),
                Filled::Partly(n) | Filled::Full(n) => read_total += n as u64,
            }
        }
        Ok((read_total, false))
    }
}
