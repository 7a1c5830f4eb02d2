//! Flow control of one spliced direction: how far the probe may run ahead of the
//! destination socket, and what happens when the destination falls behind.
//!
//! A redirect has no backpressure of its own (README, "Flow control of the spliced
//! path"): the kernel acknowledges a redirected byte to its sender at once and queues it
//! for the destination's kworker without limit. So the probe redirects a direction's
//! bytes only within a [`Credit`], counted in bytes redirected since the direction joined
//! the maps, and this module extends that credit from what the destination has really
//! taken into its send queue (`kernel_moved`): the kernel never holds more than the
//! backlog for the direction beyond the two sockets' own buffers.
//!
//! A quarter of the way through a credit the probe asks for more on its ring, and the
//! worker grants a span past what the destination has taken by then, as large as the
//! direction's [`Promise`] from the proxy's budget (budget.rs) renews to. A destination
//! slower than its sender takes less than the sender sends, so the credit runs out: the
//! next message parks in its own socket's receive queue, charged to that socket's
//! receive buffer, and every later message parks behind it. Parked bytes are not eaten,
//! so they close the source's TCP window and block the sender, as a direct connection
//! would. Once the kernel has written everything it redirected before the park, this
//! process peeks the parked bytes and writes them to the destination, grants new credit
//! with `unparked` equal to `parked`, and only then reads them out of the source, and the
//! probe redirects again: redirected bytes, parked bytes, redirected bytes, in that order
//! on the one egress, so none overtakes another. Peeked, the parked bytes keep the
//! source's window shut until the grant; read first, they would reopen it, and a sender
//! faster than the destination would park more before every grant, so that a slow
//! client's download crossed userspace almost whole (docs/flow-control.md, "On a link
//! slower than the sender").
//!
//! Nothing here takes a source out of `SPLICED` while its bytes flow: the kernel then
//! drops the rest of a batch the verdict is running (docs/flow-control.md).

use std::{
    cell::RefCell,
    io,
    os::fd::BorrowedFd,
    time::{Duration, Instant},
};

use super::{SPLICED_SEND_BUFFER, copy::write_now};
use crate::{
    budget::Promise,
    probe::{Cookie, Credit, FLOWING, Flow, SpliceMaps},
    socket,
};

/// The first look at a throttled direction's destination, and the interval after
/// progress. Its queue drains at the speed of its reader, so a look much sooner finds
/// little done.
const FIRST_LOOK: Duration = Duration::from_millis(1);

/// The longest interval between looks at a throttled direction whose reader has stopped:
/// the most a resumed reader can wait when no send-buffer event wakes the worker first,
/// and a bound on the syscalls a stalled pair costs (2 per look).
const LAST_LOOK: Duration = Duration::from_millis(64);

/// Parked bytes moved per step before the worker serves its other connections; the
/// direction is looked at again right after.
const PARKED_BUDGET: usize = 1 << 20;

/// Room in a peek beyond the source's receive buffer, for what the kernel charged to it
/// past its limit: a peek that fills its buffer is not known to have seen the last byte.
const PEEK_SLACK: usize = 64 * 1024;

thread_local! {
    /// A worker's buffer for the parked bytes it peeks: a hand-back never waits holding
    /// it, so one per thread serves every throttled direction.
    static PEEKED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The receive buffer a spliced socket joins with (`SO_RCVBUF`; the kernel doubles it).
/// Parked bytes are bounded by the source's receive window and, on 6.12 and older
/// kernels, by nothing else (6.18 holds them to `tcp_mem`): TCP accepts a segment into
/// an empty receive queue whatever `tcp_mem` says, and the verdict keeps the queue empty
/// (docs/flow-control.md, "Parking past tcp_mem"). With the kernel's autotuning a
/// spliced socket's buffer grows as fast as the verdict takes bytes, to `tcp_rmem`'s
/// maximum (6 MiB on Debian), so a thousand stalled uploads parked gigabytes; from
/// here it grows only as [`ReceiveWindow`] allows.
pub const FIRST_RECEIVE_BUFFER: usize = 128 * 1024;

/// The receive buffer a source that was copied first joins with: the one it had, which
/// the kernel autotuned to the stream's pace (it reports it doubled), even past
/// [`LAST_RECEIVE_BUFFER`] (`tcp_rmem` may allow more than Debian's 6 MiB). A smaller
/// one would turn away what the window it had already offered lets in
/// (docs/kernel.md, "Splicing a connection that was copied").
pub fn joining_buffer(reported: usize) -> usize {
    (reported / 2).max(FIRST_RECEIVE_BUFFER)
}

/// The least receive buffer a source has when this process reads its parked bytes: a
/// window of four 64 KiB loopback segments. A sender left with less than a segment of
/// window waits for its persist timer (200 ms and more), and only a read that at least
/// doubles the window sends the update that spares it the wait (docs/kernel.md, "A read
/// sends a window update only if it doubles the window"); at [`FIRST_RECEIVE_BUFFER`]
/// the largest window is about two segments, and after a hand-back the sender sat on its
/// timer. Only a direction that hands back needs it, so a source that stalls from the
/// start keeps the smaller buffer, which is what a thousand stalled connections cost
/// (on 6.1 and 6.12, where parked bytes pass `tcp_mem`, joining with this one let them
/// creep on past the bound's test).
const HAND_BACK_RECEIVE_BUFFER: usize = 256 * 1024;

/// The largest receive buffer [`ReceiveWindow`] grows a source to (doubled by the
/// kernel: 6 MiB, Debian's `tcp_rmem` maximum).
const LAST_RECEIVE_BUFFER: usize = 3 << 20;

/// One direction the kernel moves.
pub(super) struct KernelFlow {
    /// The source socket's cookie: its key in `FLOW` and `CREDIT`.
    cookie: Cookie,
    /// The destination's `bytes_written` when the kernel took over: from then on every
    /// byte written into it was redirected by the kernel or copied here (`copied`).
    base: u64,
    /// Bytes this process wrote into the destination since `base`.
    copied: u64,
    /// Bytes this process read from the source since the kernel took over: parked ones
    /// ([`Credit::unparked`] once written).
    unparked: u64,
    /// The credit last granted, or the first credit the direction joined with.
    credit: Credit,
    /// Whether `credit` was granted, which is a record in the probe's `CREDIT` map
    /// until the engine removes it.
    recorded: bool,
    /// The budget's promise that covers `credit`: the most the kernel may hold for the
    /// direction. Given back when the pair ends.
    promise: Promise,
    /// Set while the direction moves parked bytes.
    throttle: Option<Throttle>,
    /// Where taking back an idle direction's promise has got to.
    reclaim: Reclaim,
    /// Times the direction parked, for the access log.
    throttles: u32,
    /// Bytes the kernel held for the direction at the last look (redirected, not yet in
    /// the destination's send queue), for the metrics.
    held: u64,
    window: ReceiveWindow,
    /// Whether the destination has its [`SPLICED_SEND_BUFFER`], which it gets at the
    /// direction's first ask.
    send_buffer_grown: bool,
}

/// The source's receive buffer, which bounds how much can park, grown in the kernel's
/// place: once the destination's peer has acknowledged a buffer's worth since the last
/// growth while the destination kept up (the kernel held less than a buffer for the
/// direction and it did not throttle), it doubles until it is larger than what was
/// acknowledged, so a sender that sets the pace gets the window a fast transfer needs
/// within one look (a look comes with an ask for credit, which can be megabytes
/// apart); where the destination sets the pace, a larger window would only park more
/// per throttle.
struct ReceiveWindow {
    /// What the buffer was last set to.
    buffer: usize,
    /// The destination's `bytes_acked` at the last growth, or at the last throttle
    /// since.
    acked_at: u64,
    /// The direction's throttles at the last growth: a direction that throttled is
    /// limited by its destination, and a larger window would only park more.
    throttles_at: u32,
}

/// A direction whose bytes parked: set until this process has moved them all.
struct Throttle {
    /// `Flow::redirected` when the throttle began: final until the direction flows.
    redirected: u64,
    /// Parked bytes at the head of the source's queue already written to the
    /// destination: peeked, not yet read out.
    written_ahead: usize,
    /// When to look again if no socket event comes first, and the interval after that.
    next_look: Instant,
    interval: Duration,
    /// `kernel_moved` at the last look, to tell progress from a stopped reader.
    last_moved: u64,
}

/// Taking back what an idle direction was promised, over two sweeps of the worker: a
/// credit can be lowered only under a verdict that may be running with the old one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reclaim {
    /// What the direction had redirected at the last sweep: the same at the next, and it
    /// is idle.
    Watching(u64),
    /// Its credit was lowered to this at the last sweep. A verdict that had read the old
    /// one then has long finished (a verdict runs in microseconds), so what it may have
    /// redirected under it is in `FLOW` now.
    Lowered(Credit),
}

/// What a direction in the kernel needs from the worker after [`KernelFlow::unthrottle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unpark {
    /// The bytes flow in the kernel.
    Flowing,
    /// The direction waits for its destination: look again at this time, or sooner when
    /// either socket reports readiness.
    Waiting(Instant),
}

impl KernelFlow {
    /// `promise` covers the first credit the direction joined the maps with, and
    /// `buffer` is the receive buffer its source joined with.
    pub fn new(cookie: Cookie, base: u64, promise: Promise, buffer: usize) -> KernelFlow {
        KernelFlow {
            cookie,
            base,
            copied: 0,
            unparked: 0,
            credit: Credit::first(promise.bytes()),
            recorded: false,
            promise,
            throttle: None,
            reclaim: Reclaim::Watching(0),
            throttles: 0,
            held: 0,
            window: ReceiveWindow {
                buffer,
                acked_at: 0,
                throttles_at: 0,
            },
            send_buffer_grown: false,
        }
    }

    pub fn throttles(&self) -> u32 {
        self.throttles
    }

    pub fn held(&self) -> u64 {
        self.held
    }

    /// Whether the direction is throttled: the source must be watched for reads and the
    /// destination for room.
    pub fn is_throttled(&self) -> bool {
        self.throttle.is_some()
    }

    /// Bytes the kernel's redirect has written into the destination.
    fn kernel_moved(&self, dst: BorrowedFd<'_>) -> io::Result<u64> {
        Ok(self.redirected_of(socket::bytes_written(dst)?))
    }

    /// The part of the destination's [`socket::bytes_written`] the kernel's redirect wrote.
    fn redirected_of(&self, written: u64) -> u64 {
        written
            .saturating_sub(self.base)
            .saturating_sub(self.copied)
    }

    /// The probe asked: a quarter of the credit is used, or the direction parked. Grants
    /// credit from what the destination has taken, or starts moving the parked bytes.
    pub fn on_ask(
        &mut self,
        maps: &mut SpliceMaps,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
    ) -> io::Result<()> {
        if !self.send_buffer_grown {
            // A smaller buffer is slower, not wrong.
            let _ = socket::grow_send_buffer(dst, SPLICED_SEND_BUFFER);
            self.send_buffer_grown = true;
        }
        if self.throttle.is_some() {
            return Ok(());
        }
        // One TCP_INFO for both: the window's growth and the credit read the same socket.
        let (written, info) = socket::written_and_info(dst)?;
        let flow = maps.flow(self.cookie).map_err(io::Error::other)?;
        let moved = self.redirected_of(written);
        self.held = flow.redirected.saturating_sub(moved);
        self.window
            .grow(src, info.bytes_acked, self.held, self.throttles)?;
        if self.has_unmoved_park(&flow) {
            self.throttle(flow.redirected, moved);
            return Ok(());
        }
        self.grant_from(maps, moved, flow.redirected)
    }

    fn throttle(&mut self, redirected: u64, moved: u64) {
        self.throttles += 1;
        self.throttle = Some(Throttle {
            redirected,
            written_ahead: 0,
            next_look: Instant::now(),
            interval: FIRST_LOOK,
            last_moved: moved,
        });
    }

    /// Credit for the span the budget renews the direction's promise to, past `moved`;
    /// the probe asks again once it has redirected another quarter of it, or another
    /// buffer's worth if that is less while the source's window can still grow and its
    /// sender sets the pace (the direction never throttled: on loopback, where the
    /// sender always outruns the destination, asking that often cost CPU for nothing).
    fn grant_from(&mut self, maps: &mut SpliceMaps, moved: u64, redirected: u64) -> io::Result<()> {
        // What the probe may still redirect under the last credit stays promised, and
        // what it redirected past a lowered one (`reclaim`) is held.
        let committed = self.credit.limit.max(redirected).saturating_sub(moved);
        let span = self.promise.renew(committed);
        let limit = moved + span;
        let mut step = span / 4;
        if !self.window.is_largest() && self.throttles == 0 {
            step = step.min(self.window.buffer as u64);
        }
        self.grant(maps, limit, (redirected + step).min(limit))
    }

    /// Whether the direction was granted credit of its own, which is a record in the
    /// probe's `CREDIT` map until the engine removes it.
    pub fn has_credit_record(&self) -> bool {
        self.recorded
    }

    /// Writes a credit no field of which is below the last one's: the probe compares
    /// against whichever it reads.
    fn grant(&mut self, maps: &mut SpliceMaps, limit: u64, ask_at: u64) -> io::Result<()> {
        let last = self.credit;
        let credit = Credit {
            limit: limit.max(last.limit),
            ask_at: ask_at.max(last.ask_at),
            unparked: self.unparked,
        };
        if credit != last {
            maps.grant(self.cookie, credit).map_err(io::Error::other)?;
            self.credit = credit;
            self.recorded = true;
        }
        Ok(())
    }

    /// One sweep's look at the direction's promise, while the budget is tight: one that
    /// redirected nothing since the last sweep has its credit lowered to what it
    /// redirected, and at the next sweep, unless it was granted credit since, its promise
    /// shrinks to what the destination has not taken yet (and what a verdict still
    /// running with the old credit redirected). The direction's next message parks and
    /// asks for credit, as a new direction's would past its first credit.
    pub fn reclaim(&mut self, maps: &mut SpliceMaps, dst: BorrowedFd<'_>) -> io::Result<()> {
        if self.throttle.is_some() || (self.promise.bytes() == 0 && !self.reclaim_pending()) {
            return Ok(());
        }
        let flow = maps.flow(self.cookie).map_err(io::Error::other)?;
        self.reclaim = match self.reclaim {
            Reclaim::Lowered(credit) if credit == self.credit => {
                let moved = self.kernel_moved(dst)?;
                self.promise
                    .shrink_to(credit.limit.max(flow.redirected).saturating_sub(moved));
                Reclaim::Watching(flow.redirected)
            }
            // Every parked byte moved: a direction whose last bytes parked is idle too,
            // though the probe marks it flowing only at its next message.
            Reclaim::Watching(seen)
                if seen == flow.redirected
                    && flow.parked == self.unparked
                    && self.credit.limit > flow.redirected =>
            {
                let credit = Credit {
                    limit: flow.redirected,
                    ask_at: flow.redirected,
                    unparked: self.unparked,
                };
                maps.grant(self.cookie, credit).map_err(io::Error::other)?;
                self.credit = credit;
                self.recorded = true;
                Reclaim::Lowered(credit)
            }
            _ => Reclaim::Watching(flow.redirected),
        };
        Ok(())
    }

    /// Whether a lowered credit waits for its second sweep.
    fn reclaim_pending(&self) -> bool {
        matches!(self.reclaim, Reclaim::Lowered(_))
    }

    /// Moves a throttled direction on as far as it can go now.
    pub fn unthrottle(
        &mut self,
        maps: &mut SpliceMaps,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
    ) -> io::Result<Unpark> {
        let Some(mut throttle) = self.throttle.take() else {
            return Ok(Unpark::Flowing);
        };
        let step = self.step(&mut throttle, maps, src, dst);
        if !matches!(step, Ok(Unpark::Flowing)) {
            self.throttle = Some(throttle);
        }
        step
    }

    fn step(
        &mut self,
        throttle: &mut Throttle,
        maps: &mut SpliceMaps,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
    ) -> io::Result<Unpark> {
        let now = Instant::now();
        let moved = self.kernel_moved(dst)?;
        self.held = throttle.redirected.saturating_sub(moved);
        // Bytes this process writes may not overtake what the kernel still holds.
        if self.held > 0 {
            // A look before its time was an event: the destination has room, so its
            // reader reads again, and the kworker writes what it holds within a tick.
            // Looked at on the backed-off timer instead, that write is seen up to
            // LAST_LOOK late: the kworker writes without filling the send buffer, so
            // no further event comes (docs/flow-control.md, "How long a resume takes").
            if moved > throttle.last_moved || now < throttle.next_look {
                throttle.interval = FIRST_LOOK;
            } else {
                throttle.interval = (throttle.interval * 2).min(LAST_LOOK);
            }
            throttle.last_moved = moved;
            throttle.next_look = now + throttle.interval;
            return Ok(Unpark::Waiting(throttle.next_look));
        }
        self.move_parked(throttle, maps, src, dst, now)
    }

    /// Writes the parked bytes to the destination; once none is left, new credit hands
    /// the direction back to the kernel.
    ///
    /// The bytes are peeked and written, and read out of the source only once all of
    /// them, and any that parked behind them meanwhile, are written and the credit
    /// granted: reading them would reopen the source's window, and whatever the sender
    /// put into it before the grant would park too and have to be moved the same way, a
    /// race a fast sender wins for megabytes (docs/flow-control.md, "The hand-back waits
    /// for the last park"). Left in place, they keep the window shut.
    fn move_parked(
        &mut self,
        throttle: &mut Throttle,
        maps: &mut SpliceMaps,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        now: Instant,
    ) -> io::Result<Unpark> {
        PEEKED.with_borrow_mut(|peeked| {
            peeked.resize(2 * self.window.buffer + PEEK_SLACK, 0);
            let mut moved_now = 0;
            loop {
                if moved_now >= PARKED_BUDGET {
                    return Ok(Unpark::Waiting(Instant::now()));
                }
                let queued = match socket::peek_queued(src, peeked) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                    Err(e) => return Err(e.into()),
                };
                if queued < throttle.written_ahead {
                    // The bytes written ahead are still at the head of the queue, unread,
                    // but this peek did not show them all (6.1 answers EAGAIN while
                    // segments wait in the receive queue for the verdict): look again,
                    // rather than take what follows them for what they were.
                    return Ok(Unpark::Waiting(now + FIRST_LOOK));
                }
                let ahead = throttle.written_ahead;
                let written = write_now(dst, &peeked[ahead..queued])?;
                self.unparked += written as u64;
                self.copied += written as u64;
                moved_now += written;
                throttle.written_ahead = ahead + written;
                let all_seen = queued < peeked.len();
                if throttle.written_ahead < queued || !all_seen {
                    if !all_seen && throttle.written_ahead >= peeked.len() / 2 {
                        // More parked than one peek sees: make room to see the rest.
                        self.window.ready_for_read(src)?;
                        discard(src, &mut peeked[..throttle.written_ahead])?;
                        throttle.written_ahead = 0;
                    }
                    if written == 0 || throttle.written_ahead < queued {
                        // The destination is full: its next room wakes the worker.
                        return Ok(Unpark::Waiting(now + LAST_LOOK));
                    }
                    continue;
                }
                // Everything redirected before is in the destination: `moved` is
                // `redirected`, and the credit runs from there.
                self.grant_from(maps, throttle.redirected, throttle.redirected)?;
                // A message may have parked after the peek, and the probe parks until
                // `unparked` catches up with it: move it too, and read nothing out until
                // then. Each read reopens the window, so a sender faster than this loop
                // would park again behind every read for as long as the loop went on;
                // unread, the bytes close the window within one buffer.
                let flow = maps.flow(self.cookie).map_err(io::Error::other)?;
                if flow.parked == self.unparked {
                    self.window.ready_for_read(src)?;
                    discard(src, &mut peeked[..throttle.written_ahead])?;
                    throttle.written_ahead = 0;
                    self.held = 0;
                    return Ok(Unpark::Flowing);
                }
                if flow.redirected != throttle.redirected {
                    // It flowed for a moment after the grant, and parked again beyond it:
                    // those redirected bytes come before the new parked ones.
                    self.throttles += 1;
                    throttle.redirected = flow.redirected;
                    throttle.interval = FIRST_LOOK;
                    throttle.next_look = now + FIRST_LOOK;
                    return Ok(Unpark::Waiting(throttle.next_look));
                }
                if written == 0 {
                    // Counted as parked but not yet in the receive queue: its arrival
                    // wakes the worker, and the look is a fallback.
                    return Ok(Unpark::Waiting(now + FIRST_LOOK));
                }
            }
        })
    }

    /// Whether every byte the source sent after the kernel took over, `owed` in all,
    /// is in the destination: redirected by the kernel or copied here. On a shortfall it
    /// starts moving parked bytes the probe's ask did not announce (the ring was full).
    pub fn delivered(
        &mut self,
        maps: &mut SpliceMaps,
        dst: BorrowedFd<'_>,
        owed: u64,
    ) -> io::Result<bool> {
        if self.throttle.is_some() {
            return Ok(false);
        }
        let moved = self.kernel_moved(dst)?;
        if moved + self.unparked >= owed {
            return Ok(true);
        }
        let flow = maps.flow(self.cookie).map_err(io::Error::other)?;
        if self.has_unmoved_park(&flow) {
            self.throttle(flow.redirected, moved);
        }
        Ok(false)
    }

    /// Starts moving the bytes of a park whose ask the probe's full ring refused, if the
    /// direction has one; whether it had. A park's ask is retried only with the next
    /// message, and a sender whose window the parked bytes closed sends none.
    pub fn find_lost_park(
        &mut self,
        maps: &mut SpliceMaps,
        dst: BorrowedFd<'_>,
    ) -> io::Result<bool> {
        if self.throttle.is_some() {
            return Ok(false);
        }
        let flow = maps.flow(self.cookie).map_err(io::Error::other)?;
        if !self.has_unmoved_park(&flow) {
            return Ok(false);
        }
        let moved = self.kernel_moved(dst)?;
        self.throttle(flow.redirected, moved);
        Ok(true)
    }

    /// Whether the probe is parking the direction's bytes and this process has not moved
    /// them all: the direction must be throttled.
    fn has_unmoved_park(&self, flow: &Flow) -> bool {
        flow.state != FLOWING && flow.parked > self.unparked
    }

    /// Bytes moved so far, redirected or copied: progress while a close waits.
    pub fn progress(&self, dst: BorrowedFd<'_>) -> io::Result<u64> {
        Ok(self.kernel_moved(dst)? + self.unparked)
    }
}

impl ReceiveWindow {
    /// Before parked bytes are read: a buffer large enough that the read reopens the
    /// sender's window ([`HAND_BACK_RECEIVE_BUFFER`]).
    fn ready_for_read(&mut self, src: BorrowedFd<'_>) -> io::Result<()> {
        if self.buffer < HAND_BACK_RECEIVE_BUFFER {
            self.resize(src, HAND_BACK_RECEIVE_BUFFER)?;
        }
        Ok(())
    }

    /// Whether the buffer has grown as far as it goes ([`LAST_RECEIVE_BUFFER`]).
    fn is_largest(&self) -> bool {
        self.buffer >= LAST_RECEIVE_BUFFER
    }

    /// Sets the buffer, and the window's clamp to the whole of it (the kernel's doubled
    /// size): the kernel's own count of free space then bounds the window, as it does
    /// for a buffer it autotunes.
    fn resize(&mut self, src: BorrowedFd<'_>, buffer: usize) -> io::Result<()> {
        socket::set_receive_buffer(src, buffer)?;
        socket::set_window_clamp(src, 2 * buffer)?;
        self.buffer = buffer;
        Ok(())
    }

    /// `acked`: the destination's `bytes_acked` now; `held`: what the kernel holds for
    /// the direction now; `throttles`: the direction's throttles so far.
    fn grow(
        &mut self,
        src: BorrowedFd<'_>,
        acked: u64,
        held: u64,
        throttles: u32,
    ) -> io::Result<()> {
        if self.is_largest() {
            return Ok(());
        }
        if throttles != self.throttles_at || held > self.buffer as u64 {
            self.throttles_at = throttles;
            self.acked_at = acked;
            return Ok(());
        }
        let acknowledged = acked.saturating_sub(self.acked_at);
        if acknowledged < self.buffer as u64 {
            return Ok(());
        }
        let mut buffer = self.buffer;
        while buffer < LAST_RECEIVE_BUFFER && buffer as u64 <= acknowledged {
            buffer *= 2;
        }
        self.resize(src, buffer.min(LAST_RECEIVE_BUFFER))?;
        self.acked_at = acked;
        Ok(())
    }
}

/// Reads out of the source the `buf.len()` bytes at its head, peeked and written before.
fn discard(src: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match socket::read(src, &mut buf[done..]) {
            Ok(0) => {
                return Err(io::Error::other("parked bytes peeked were gone when read"));
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::{
        io::{self, Write},
        net::TcpStream,
        os::fd::AsFd,
        thread,
        time::{Duration, Instant},
    };

    use super::{
        Cookie, FIRST_RECEIVE_BUFFER, HAND_BACK_RECEIVE_BUFFER, KernelFlow, LAST_RECEIVE_BUFFER,
        Promise, ReceiveWindow,
    };
    use crate::socket::{self, connected};

    /// The source's receive buffer as the kernel has it (twice what was set).
    fn receive_buffer(src: &TcpStream) -> usize {
        socket2::SockRef::from(src).recv_buffer_size().unwrap()
    }

    /// A window at its first size over `src`, whose buffer is set to match.
    fn first_window(src: &TcpStream) -> ReceiveWindow {
        socket::set_receive_buffer(src.as_fd(), FIRST_RECEIVE_BUFFER).unwrap();
        ReceiveWindow {
            buffer: FIRST_RECEIVE_BUFFER,
            acked_at: 0,
            throttles_at: 0,
        }
    }

    const FIRST: u64 = FIRST_RECEIVE_BUFFER as u64;

    #[test]
    fn the_window_doubles_once_a_buffer_is_acknowledged_while_the_destination_keeps_up() {
        let (src, _peer) = connected();
        let mut window = first_window(&src);
        let before = receive_buffer(&src);
        window.grow(src.as_fd(), FIRST - 1, 0, 0).unwrap();
        assert_eq!(window.buffer, FIRST_RECEIVE_BUFFER);
        assert_eq!(receive_buffer(&src), before);
        window.grow(src.as_fd(), FIRST, 0, 0).unwrap();
        assert_eq!(
            (window.buffer, window.acked_at),
            (2 * FIRST_RECEIVE_BUFFER, FIRST)
        );
        assert!(
            receive_buffer(&src) > before,
            "the socket's buffer did not grow"
        );
        // The next doubling needs the new buffer's worth acknowledged since.
        window.grow(src.as_fd(), 3 * FIRST - 1, 0, 0).unwrap();
        assert_eq!(window.buffer, 2 * FIRST_RECEIVE_BUFFER);
        window.grow(src.as_fd(), 3 * FIRST, 0, 0).unwrap();
        assert_eq!(window.buffer, 4 * FIRST_RECEIVE_BUFFER);
    }

    #[test]
    fn the_window_grows_past_what_was_acknowledged_since_the_last_look() {
        let (src, _peer) = connected();
        let mut window = first_window(&src);
        window.grow(src.as_fd(), 10 * FIRST, 0, 0).unwrap();
        assert_eq!(window.buffer, 16 * FIRST_RECEIVE_BUFFER);
        window.grow(src.as_fd(), 100 * FIRST, 0, 0).unwrap();
        assert_eq!(window.buffer, LAST_RECEIVE_BUFFER);
    }

    #[test]
    fn a_throttle_since_the_last_growth_holds_the_window_and_restarts_the_count() {
        let (src, _peer) = connected();
        let mut window = first_window(&src);
        let before = receive_buffer(&src);
        window.grow(src.as_fd(), 10 * FIRST, 0, 1).unwrap();
        assert_eq!(window.buffer, FIRST_RECEIVE_BUFFER);
        assert_eq!((window.acked_at, window.throttles_at), (10 * FIRST, 1));
        assert_eq!(receive_buffer(&src), before);
        // Counted from the throttle, not from the last growth.
        window.grow(src.as_fd(), 11 * FIRST - 1, 0, 1).unwrap();
        assert_eq!(window.buffer, FIRST_RECEIVE_BUFFER);
        window.grow(src.as_fd(), 11 * FIRST, 0, 1).unwrap();
        assert_eq!(window.buffer, 2 * FIRST_RECEIVE_BUFFER);
    }

    #[test]
    fn the_kernel_holding_more_than_a_buffer_holds_the_window() {
        let (src, _peer) = connected();
        let mut window = first_window(&src);
        window.grow(src.as_fd(), 10 * FIRST, FIRST + 1, 0).unwrap();
        assert_eq!(
            (window.buffer, window.acked_at),
            (FIRST_RECEIVE_BUFFER, 10 * FIRST)
        );
        // A buffer held is still keeping up.
        window.grow(src.as_fd(), 11 * FIRST, FIRST, 0).unwrap();
        assert_eq!(window.buffer, 2 * FIRST_RECEIVE_BUFFER);
    }

    #[test]
    fn the_window_stops_at_its_largest() {
        let (src, _peer) = connected();
        let mut window = ReceiveWindow {
            buffer: 2 << 20,
            acked_at: 0,
            throttles_at: 0,
        };
        window.grow(src.as_fd(), 2 << 20, 0, 0).unwrap();
        assert_eq!(window.buffer, LAST_RECEIVE_BUFFER);
        window.grow(src.as_fd(), 100 << 20, 0, 0).unwrap();
        assert_eq!(
            (window.buffer, window.acked_at),
            (LAST_RECEIVE_BUFFER, 2 << 20)
        );
    }

    #[test]
    fn a_grown_buffer_is_a_grown_window() {
        let (src, mut peer) = connected();
        let mut window = first_window(&src);
        let mut acked = 0;
        while window.buffer < LAST_RECEIVE_BUFFER {
            acked += window.buffer as u64;
            window.grow(src.as_fd(), acked, 0, 0).unwrap();
        }
        // The kernel fixed the clamp at the handshake (64 KiB here). For a buffer it does
        // not autotune, 6.12 moves it only when the segments' ratio of payload to memory
        // changes, which a steady stream of full segments never does.
        let clamp = socket::window_clamp(src.as_fd()).unwrap() as usize;
        assert!(
            clamp >= receive_buffer(&src),
            "the window's clamp {clamp} is under the buffer {}",
            receive_buffer(&src)
        );
        // Nothing reads `src`: what the peer gets acknowledged is what the window let in.
        peer.set_nonblocking(true).unwrap();
        let chunk = vec![0; 64 * 1024];
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut in_src = 0;
        while in_src < 2 << 20 && Instant::now() < deadline {
            match peer.write(&chunk) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("writing to the unread socket: {e}"),
            }
            in_src = socket::tcp_info(peer.as_fd()).unwrap().bytes_acked;
        }
        assert!(
            in_src >= 2 << 20,
            "the window let only {in_src} bytes into a buffer of {}",
            receive_buffer(&src)
        );
    }

    #[test]
    fn a_hand_back_raises_only_a_smaller_buffer() {
        let (src, _peer) = connected();
        let mut window = first_window(&src);
        let before = receive_buffer(&src);
        window.ready_for_read(src.as_fd()).unwrap();
        assert_eq!(window.buffer, HAND_BACK_RECEIVE_BUFFER);
        assert!(
            receive_buffer(&src) > before,
            "the socket's buffer did not grow"
        );
        let mut grown = ReceiveWindow {
            buffer: 2 * HAND_BACK_RECEIVE_BUFFER,
            acked_at: 0,
            throttles_at: 0,
        };
        grown.ready_for_read(src.as_fd()).unwrap();
        assert_eq!(grown.buffer, 2 * HAND_BACK_RECEIVE_BUFFER);
    }

    #[test]
    fn the_redirected_bytes_are_those_written_since_the_base_less_those_copied() {
        let mut flow = KernelFlow::new(
            Cookie::fake(1),
            1000,
            Promise::for_tests(),
            FIRST_RECEIVE_BUFFER,
        );
        assert_eq!(flow.redirected_of(1500), 500);
        flow.copied = 200;
        assert_eq!(flow.redirected_of(1500), 300);
        // Never negative: counters read around an ACK can lag.
        assert_eq!(flow.redirected_of(1100), 0);
        assert_eq!(flow.redirected_of(900), 0);
    }

    #[test]
    fn progress_counts_the_bytes_written_into_the_destination_and_those_unparked() {
        let (mut dst, _peer) = connected();
        dst.write_all(b"before the splice").unwrap();
        let mut flow = KernelFlow::new(
            Cookie::fake(1),
            socket::bytes_written(dst.as_fd()).unwrap(),
            Promise::for_tests(),
            FIRST_RECEIVE_BUFFER,
        );
        assert_eq!(flow.progress(dst.as_fd()).unwrap(), 0);
        // As if redirected by the kernel: 300 bytes, of which this process copied 100.
        dst.write_all(&[0; 300]).unwrap();
        flow.copied = 100;
        flow.unparked = 100;
        let deadline = Instant::now() + Duration::from_secs(10);
        // Acknowledged or not, a written byte counts.
        while flow.progress(dst.as_fd()).unwrap() != 300 {
            assert!(
                Instant::now() < deadline,
                "{}",
                flow.progress(dst.as_fd()).unwrap()
            );
            thread::sleep(Duration::from_millis(1));
        }
        assert!(!flow.is_throttled() && !flow.has_credit_record());
    }
}
