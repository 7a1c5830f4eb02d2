//! The userspace copy of a direction's bytes, read from the source and written to the
//! destination without ever waiting on either. A direction the kernel cannot splice is
//! copied this way from start to end, one copied first is until it is spliced, and a
//! spliced direction uses it only for the bytes the probe parked (see `flow.rs`).

use std::{cell::RefCell, io, os::fd::BorrowedFd, time::Duration};

use crate::socket;

/// A userspace copy moves at most this much per read: large enough for a fast stream,
/// small enough that a destination that is full holds little.
const COPY_BUFFER: usize = 64 * 1024;

/// The most one drain reads ([`CopyBuffer::drain`]): more than Debian's `tcp_rmem`
/// lets a receive queue hold (6 MiB of buffer).
const DRAIN_MAX: usize = 8 << 20;

thread_local! {
    /// A worker's buffer for reads: each is written out at once, and only what the
    /// destination does not take is kept in the direction's own buffer, so one per
    /// thread serves every direction.
    static READ: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What a copied direction read and its destination has not taken yet. Reads go
/// through the worker's buffer and out to the destination at once, so a direction
/// holds bytes of its own only while its destination is full: most copied directions,
/// short exchanges and held connections, allocate nothing.
#[derive(Default)]
pub(super) struct CopyBuffer {
    /// The bytes not yet written are `held[start..]`.
    held: Vec<u8>,
    start: usize,
    /// The last read filled what it was offered: more may be queued.
    filled: bool,
    /// The last read found the source's receive queue empty (it returned less than it
    /// was offered, or nothing): no buffer of the source's is left half-read.
    drained: bool,
    /// Since a drain first found too little room in the destination, and until one
    /// moves or copying resumes: the looks it has taken, and what the destination had
    /// queued at the last.
    waiting_for_room: Option<WaitForRoom>,
}

/// What one read into a [`CopyBuffer`] found.
pub(super) enum Filled {
    /// Nothing queued (EAGAIN).
    Empty,
    Eof,
    /// Fewer bytes than offered: the receive queue is now empty.
    Partly(usize),
    /// As many as offered: more may be queued.
    Full(usize),
}

/// A drain that waits for room in its destination ([`Drain::NoRoom`]).
#[derive(Clone, Copy)]
struct WaitForRoom {
    looks: u32,
    queued: usize,
}

/// How long a drain that found no room, after `looks_before` earlier such looks, waits
/// before it looks again: 1 ms after the first, since a destination that reads at once
/// makes room within a millisecond or two, then twice as long after each look up to
/// 8 ms. A destination that reads, but slowly, keeps an attempt going for up to a
/// second, and this way costs it about 130 looks (two system calls each), not 1,000.
fn look_again_in(looks_before: u32) -> Duration {
    Duration::from_millis(1 << looks_before.min(3))
}

/// What [`CopyBuffer::drain`] did.
pub(super) enum Drain {
    /// It read what was queued, if anything, and wrote or kept it.
    Moved(Pumped),
    /// The destination has too little room for what is queued: nothing was read.
    /// `progressed`: its queue is shorter than at the last such look, so its reader
    /// reads. `look_in`: when to look again.
    NoRoom { progressed: bool, look_in: Duration },
}

/// What [`CopyBuffer::pump`] did.
pub(super) struct Pumped {
    /// Bytes read from the source.
    pub read: u64,
    /// Bytes written to the destination.
    pub written: u64,
    /// The source sent its FIN and everything before it has been read.
    pub eof: bool,
}

impl CopyBuffer {
    /// Nothing read is waiting to be written.
    pub fn is_empty(&self) -> bool {
        self.start == self.held.len()
    }

    /// Whether the last read left the source's queue empty: the kernel may take the
    /// direction over without redirecting a buffer this process read part of.
    pub fn is_drained(&self) -> bool {
        self.drained
    }

    /// Whether the last read filled a full-size buffer: the source streams.
    pub fn streams(&self) -> bool {
        self.filled
    }

    /// With nothing held: one read of up to [`COPY_BUFFER`] bytes, written to `dst` at
    /// once; what `dst` does not take is held. The source must be non-blocking. Adds
    /// what it wrote to `written`.
    pub fn read_once(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        written: &mut u64,
    ) -> io::Result<Filled> {
        READ.with_borrow_mut(|scratch| {
            scratch.resize(COPY_BUFFER, 0);
            let Some(n) = read_available(src, scratch)? else {
                self.drained = true;
                return Ok(Filled::Empty);
            };
            if n == 0 {
                return Ok(Filled::Eof);
            }
            self.filled = n == scratch.len();
            self.drained = !self.filled;
            self.write_out(dst, &scratch[..n], written)?;
            Ok(if self.filled {
                Filled::Full(n)
            } else {
                Filled::Partly(n)
            })
        })
    }

    /// Writes `bytes`, read just now, and holds what `dst` does not take.
    fn write_out(
        &mut self,
        dst: BorrowedFd<'_>,
        bytes: &[u8],
        written: &mut u64,
    ) -> io::Result<()> {
        let n = write_now(dst, bytes)?;
        *written += n as u64;
        self.held.clear();
        self.held.extend_from_slice(&bytes[n..]);
        self.start = 0;
        Ok(())
    }

    /// Writes the held bytes; false if `dst` would block before all were written
    /// (what is left stays held). Adds what it wrote to `written`.
    pub fn write_all_now(&mut self, dst: BorrowedFd<'_>, written: &mut u64) -> io::Result<bool> {
        let n = write_now(dst, &self.held[self.start..])?;
        self.start += n;
        *written += n as u64;
        if !self.is_empty() {
            return Ok(false);
        }
        self.held.clear();
        self.start = 0;
        Ok(true)
    }

    /// For a direction the kernel is about to take over, with nothing in this buffer:
    /// reads everything the source has queued in one read offered more than that, so
    /// that it comes back short and leaves no buffer of the source's half-read
    /// ([`CopyBuffer::is_drained`]), and writes it; what the destination does not take
    /// waits here. Only once the destination has room for what is queued, or has
    /// nothing left to send (a queue larger than its whole buffer): so what waits is
    /// little, and never more than the source's receive queue held. A drained source
    /// must not be read again until the kernel has taken the direction over, since a
    /// later read may stop inside a buffer.
    pub fn drain(&mut self, src: BorrowedFd<'_>, dst: BorrowedFd<'_>) -> io::Result<Drain> {
        let mut moved = Pumped {
            read: 0,
            written: 0,
            eof: false,
        };
        let queued = socket::unread_bytes(src)?;
        if queued == 0 {
            self.drained = true;
            return Ok(Drain::Moved(moved));
        }
        let space = socket::send_space(dst)?;
        if space.room < queued && space.queued > 0 {
            let before = self.waiting_for_room;
            let looks_before = before.map_or(0, |was| was.looks);
            self.waiting_for_room = Some(WaitForRoom {
                looks: looks_before + 1,
                queued: space.queued,
            });
            return Ok(Drain::NoRoom {
                progressed: before.is_some_and(|was| space.queued < was.queued),
                look_in: look_again_in(looks_before),
            });
        }
        self.waiting_for_room = None;
        // A queue past DRAIN_MAX is read in parts, none of which drains it.
        let offered = (queued + COPY_BUFFER).min(DRAIN_MAX);
        READ.with_borrow_mut(|scratch| {
            scratch.resize(offered, 0);
            let Some(n) = read_available(src, &mut scratch[..offered])? else {
                self.drained = true;
                return Ok(Drain::Moved(moved));
            };
            if n == 0 {
                moved.eof = true;
                return Ok(Drain::Moved(moved));
            }
            self.drained = n < offered;
            moved.read = n as u64;
            self.write_out(dst, &scratch[..n], &mut moved.written)?;
            Ok(Drain::Moved(moved))
        })
    }

    /// Reads from `src` and writes to `dst` until one of them would block, the source
    /// ended and everything read was written, or `budget` bytes have been read and
    /// written (one buffer more at most): a worker has other connections to serve. With
    /// `short_read_ends`, a read that returns less than it was offered ends it too: the
    /// queue is empty then, and epoll's next edge tells of more.
    pub fn pump(
        &mut self,
        src: BorrowedFd<'_>,
        dst: BorrowedFd<'_>,
        budget: u64,
        short_read_ends: bool,
    ) -> io::Result<Pumped> {
        // Copying again: an attempt to drain is over, and the next compares afresh.
        self.waiting_for_room = None;
        let mut pumped = Pumped {
            read: 0,
            written: 0,
            eof: false,
        };
        while self.write_all_now(dst, &mut pumped.written)? && pumped.read < budget {
            match self.read_once(src, dst, &mut pumped.written)? {
                Filled::Empty => break,
                Filled::Eof => {
                    pumped.eof = true;
                    break;
                }
                Filled::Partly(n) => {
                    pumped.read += n as u64;
                    if short_read_ends {
                        break;
                    }
                }
                Filled::Full(n) => pumped.read += n as u64,
            }
        }
        Ok(pumped)
    }
}

/// One read of what `src` has queued into `buf`: None when nothing is (EAGAIN), 0 at
/// its end. Interrupted reads are retried. It reads with `socket::read`, not
/// `socket::read_queued`'s `recv`, so that /proc's `rchar` counts the copy (the tests
/// prove by that count that spliced bytes are never read).
fn read_available(src: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match socket::read(src, buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes as much of `bytes` as `dst` takes now; how much that was. An error after
/// some bytes went out is left for the next call to report, so that the caller counts
/// what was written.
pub(super) fn write_now(dst: BorrowedFd<'_>, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match socket::write(dst, &bytes[written..]) {
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) if written > 0 => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{Ipv4Addr, Shutdown, TcpListener, TcpStream},
        os::fd::AsFd,
        thread,
        time::{Duration, Instant},
    };

    use super::{COPY_BUFFER, CopyBuffer, Drain, Filled, Pumped};
    use crate::socket::{self, connected};

    /// A copy's four sockets: `sender` writes into `src`, `dst` is read by `reader`.
    /// `src` and `dst` are non-blocking, as the engine's are.
    struct Copy {
        sender: TcpStream,
        src: TcpStream,
        dst: TcpStream,
        reader: TcpStream,
    }

    fn copy() -> Copy {
        let (src, sender) = connected();
        let (reader, dst) = connected();
        copy_between(src, sender, dst, reader)
    }

    /// A copy whose destination fills after a few dozen KiB: its send buffer and its
    /// reader's receive buffer are small and fixed (the reader's set before it connects,
    /// so that no larger window was ever offered).
    fn copy_into_small_buffers() -> Copy {
        let (src, sender) = connected();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let reader =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        reader.set_recv_buffer_size(8 * 1024).unwrap();
        reader
            .connect(&listener.local_addr().unwrap().into())
            .unwrap();
        let (dst, _) = listener.accept().unwrap();
        socket2::SockRef::from(&dst)
            .set_send_buffer_size(8 * 1024)
            .unwrap();
        copy_between(src, sender, dst, reader.into())
    }

    fn copy_between(src: TcpStream, sender: TcpStream, dst: TcpStream, reader: TcpStream) -> Copy {
        src.set_nonblocking(true).unwrap();
        dst.set_nonblocking(true).unwrap();
        Copy {
            sender,
            src,
            dst,
            reader,
        }
    }

    /// Distinct bytes in a pattern that does not repeat at any power-of-two period, so
    /// that a dropped, repeated or reordered buffer shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Waits until `src` has at least `len` bytes queued.
    fn wait_queued(src: &TcpStream, len: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut peeked = vec![0; len];
        while socket::peek_queued(src.as_fd(), &mut peeked).unwrap_or(0) < len {
            assert!(Instant::now() < deadline, "{len} bytes never arrived");
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Pumps until the source's end has been read and every byte written.
    fn pump_to_end(buffer: &mut CopyBuffer, copy: &Copy) -> (u64, u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut read, mut written) = (0, 0);
        loop {
            let pumped = buffer
                .pump(copy.src.as_fd(), copy.dst.as_fd(), u64::MAX, false)
                .unwrap();
            read += pumped.read;
            written += pumped.written;
            if pumped.eof && buffer.is_empty() {
                return (read, written);
            }
            assert!(Instant::now() < deadline, "the copy never finished");
            thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn pump_moves_every_byte_in_order_and_reports_the_end() {
        let copy = copy();
        let sent = pattern(3 << 20);
        let mut sender = copy.sender.try_clone().unwrap();
        let to_send = sent.clone();
        let writer = thread::spawn(move || {
            sender.write_all(&to_send).unwrap();
            sender.shutdown(Shutdown::Write).unwrap();
        });
        let mut reader = copy.reader.try_clone().unwrap();
        let received = thread::spawn(move || {
            let mut received = Vec::new();
            reader.read_to_end(&mut received).unwrap();
            received
        });
        let mut buffer = CopyBuffer::default();
        let (read, written) = pump_to_end(&mut buffer, &copy);
        writer.join().unwrap();
        copy.dst.shutdown(Shutdown::Write).unwrap();
        let received = received.join().unwrap();
        assert_eq!((read, written), (sent.len() as u64, sent.len() as u64));
        assert_eq!(received.len(), sent.len());
        assert!(
            received == sent,
            "the bytes arrived altered or out of order"
        );
    }

    #[test]
    fn a_full_destination_stops_the_reads_and_keeps_the_rest_until_it_drains() {
        let copy = copy_into_small_buffers();
        let sent = pattern(1 << 20);
        let mut sender = copy.sender.try_clone().unwrap();
        let to_send = sent.clone();
        let writer = thread::spawn(move || {
            sender.write_all(&to_send).unwrap();
            sender.shutdown(Shutdown::Write).unwrap();
        });

        let mut buffer = CopyBuffer::default();
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut read, mut written) = (0, 0);
        while buffer.is_empty() {
            let pumped = buffer
                .pump(copy.src.as_fd(), copy.dst.as_fd(), u64::MAX, false)
                .unwrap();
            assert!(!pumped.eof, "the end came before the destination filled");
            (read, written) = (read + pumped.read, written + pumped.written);
            assert!(Instant::now() < deadline, "the destination never filled");
            thread::sleep(Duration::from_millis(1));
        }
        // Stuck: what was read and not written stays buffered, and nothing more is read.
        assert!(read > written && read < sent.len() as u64);
        let Pumped {
            read: more,
            written: out,
            eof,
        } = buffer
            .pump(copy.src.as_fd(), copy.dst.as_fd(), u64::MAX, false)
            .unwrap();
        assert_eq!((more, out, eof), (0, 0, false));
        assert!(!buffer.is_empty());

        let mut reader = copy.reader.try_clone().unwrap();
        let received = thread::spawn(move || {
            let mut received = Vec::new();
            reader.read_to_end(&mut received).unwrap();
            received
        });
        let (rest_read, rest_written) = pump_to_end(&mut buffer, &copy);
        writer.join().unwrap();
        copy.dst.shutdown(Shutdown::Write).unwrap();
        let received = received.join().unwrap();
        assert_eq!(read + rest_read, sent.len() as u64);
        assert_eq!(written + rest_written, sent.len() as u64);
        assert!(
            received == sent,
            "the bytes arrived altered or out of order"
        );
    }

    #[test]
    fn a_drain_without_room_looks_again_later_each_time_until_it_moves() {
        let mut copy = copy_into_small_buffers();
        // The destination's queue holds what its reader has not taken.
        let mut filler = pattern(256 * 1024);
        let mut into_dst = 0;
        while let Ok(n) = socket::write(copy.dst.as_fd(), &filler[into_dst..]) {
            into_dst += n;
            assert!(into_dst < filler.len(), "the destination never filled");
        }
        copy.sender.write_all(&pattern(16 * 1024)).unwrap();
        wait_queued(&copy.src, 16 * 1024);
        let mut buffer = CopyBuffer::default();
        let mut looks = Vec::new();
        for _ in 0..5 {
            match buffer.drain(copy.src.as_fd(), copy.dst.as_fd()).unwrap() {
                Drain::NoRoom {
                    progressed,
                    look_in,
                } => {
                    assert!(!progressed, "a reader that never read made progress");
                    looks.push(look_in.as_millis());
                }
                Drain::Moved(_) => panic!("a drain read into a full destination"),
            }
        }
        assert_eq!(looks, [1, 2, 4, 8, 8]);

        // Once the reader has taken everything, the drain moves the source's bytes, and
        // the next wait for room starts again at 1 ms.
        let mut taken = vec![0; into_dst];
        copy.reader.read_exact(&mut taken).unwrap();
        filler.truncate(into_dst);
        assert!(taken == filler);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match buffer.drain(copy.src.as_fd(), copy.dst.as_fd()).unwrap() {
                Drain::Moved(moved) => {
                    assert_eq!(moved.read, 16 * 1024);
                    break;
                }
                Drain::NoRoom { .. } => {
                    assert!(Instant::now() < deadline, "room never came");
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }
        assert!(buffer.waiting_for_room.is_none());
    }

    #[test]
    fn pump_of_an_empty_source_moves_nothing_and_is_not_the_end() {
        let copy = copy();
        let mut buffer = CopyBuffer::default();
        let pumped = buffer
            .pump(copy.src.as_fd(), copy.dst.as_fd(), u64::MAX, false)
            .unwrap();
        assert_eq!((pumped.read, pumped.written, pumped.eof), (0, 0, false));
    }

    #[test]
    fn pump_reports_the_end_after_the_bytes_before_it() {
        let mut copy = copy();
        copy.sender.write_all(b"last words").unwrap();
        copy.sender.shutdown(Shutdown::Write).unwrap();
        let mut buffer = CopyBuffer::default();
        assert_eq!(pump_to_end(&mut buffer, &copy), (10, 10));
        copy.dst.shutdown(Shutdown::Write).unwrap();
        let mut received = Vec::new();
        copy.reader.read_to_end(&mut received).unwrap();
        assert_eq!(received, b"last words");
        // The end stays the end.
        let again = buffer
            .pump(copy.src.as_fd(), copy.dst.as_fd(), u64::MAX, false)
            .unwrap();
        assert_eq!((again.read, again.written, again.eof), (0, 0, true));
    }

    #[test]
    fn pump_of_a_source_closed_without_bytes_is_the_end_at_once() {
        let copy = copy();
        copy.sender.shutdown(Shutdown::Write).unwrap();
        let mut buffer = CopyBuffer::default();
        assert_eq!(pump_to_end(&mut buffer, &copy), (0, 0));
    }

    #[test]
    fn a_read_the_destination_takes_whole_is_held_nowhere() {
        let mut copy = copy();
        let mut buffer = CopyBuffer::default();
        for _ in 0..3 {
            copy.sender.write_all(&[7; 100]).unwrap();
            wait_queued(&copy.src, 100);
            let mut written = 0;
            assert!(matches!(
                buffer
                    .read_once(copy.src.as_fd(), copy.dst.as_fd(), &mut written)
                    .unwrap(),
                Filled::Partly(100)
            ));
            assert_eq!(written, 100);
            assert!(buffer.is_empty() && buffer.is_drained() && !buffer.streams());
            assert_eq!(
                buffer.held.capacity(),
                0,
                "a direction allocated for nothing"
            );
        }
    }

    #[test]
    fn a_read_that_fills_its_buffer_streams_and_is_not_drained() {
        let mut copy = copy();
        copy.sender.write_all(&pattern(100 * 1024)).unwrap();
        wait_queued(&copy.src, COPY_BUFFER + 1);
        let mut buffer = CopyBuffer::default();
        assert!(matches!(
            buffer
                .read_once(copy.src.as_fd(), copy.dst.as_fd(), &mut 0)
                .unwrap(),
            Filled::Full(COPY_BUFFER)
        ));
        assert!(buffer.streams() && !buffer.is_drained());
    }

    #[test]
    fn pump_stops_after_the_read_that_reaches_its_budget_with_everything_written() {
        let mut copy = copy();
        // Room for everything: only the budget stops a pump here.
        socket2::SockRef::from(&copy.src)
            .set_recv_buffer_size(1 << 20)
            .unwrap();
        socket2::SockRef::from(&copy.dst)
            .set_send_buffer_size(1 << 20)
            .unwrap();
        let sent = pattern(200 * 1024);
        copy.sender.write_all(&sent).unwrap();
        wait_queued(&copy.src, sent.len());
        let mut buffer = CopyBuffer::default();
        // A budget of one byte still moves one buffer, and only one.
        let pumped = buffer
            .pump(copy.src.as_fd(), copy.dst.as_fd(), 1, false)
            .unwrap();
        assert_eq!((pumped.read, pumped.written), (65_536, 65_536));
        assert!(buffer.is_empty());
        // Whole buffers until the budget is reached: 64 KiB, then a second past it.
        let pumped = buffer
            .pump(copy.src.as_fd(), copy.dst.as_fd(), 70_000, false)
            .unwrap();
        assert_eq!(
            (pumped.read, pumped.written, pumped.eof),
            (131_072, 131_072, false)
        );
        assert!(buffer.is_empty());
        wait_queued(&copy.src, sent.len() - 196_608);
        copy.sender.shutdown(Shutdown::Write).unwrap();
        assert_eq!(
            pump_to_end(&mut buffer, &copy),
            (sent.len() as u64 - 196_608, sent.len() as u64 - 196_608)
        );
        copy.dst.shutdown(Shutdown::Write).unwrap();
        let mut received = Vec::new();
        copy.reader.read_to_end(&mut received).unwrap();
        assert!(
            received == sent,
            "the bytes arrived altered or out of order"
        );
    }
}
